#!/usr/bin/env bash
# fusefeat on a real SLURM: a single-node cluster on localhost (munged, slurmctld, slurmd from a
# generated slurm.conf; CPU only), driven through scripts/slurm/extract_array.sbatch.
#
#   1. a real audio folder (CLIPS clips of FSDD) and a random-weight VGGish checkpoint in the
#      official format; a single-process run of fusefeat as the reference;
#   2. an array job of 3 tasks into one directory; `fusefeat status` says all complete;
#      `fusefeat merge`; the merged file holds the reference's paths (sorted) and vectors;
#   3. the same array into a new directory, with task 1 cancelled (scancel) after its first
#      commit; status reports part 1 partial and prints the resubmission command; that very
#      command is run; status says all complete; merged result compared again.
#
# Needs root (the daemons, and apt-get when slurm-wlm or munge are missing). Nothing outside
# a scratch folder is written; the daemons listen on free ports and their own munge socket,
# so the machine's own SLURM, if any, is left alone. They are stopped by their pid files.
#
#   scripts/test_slurm.sh            PYTHON=.venv/bin/python scripts/test_slurm.sh
#   KEEP=1 keeps the scratch folder; CLIPS=N changes the corpus size (default 120).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=$(realpath -s "$(command -v "${PYTHON:-python3}")")
CLIPS=${CLIPS:-120}
FSDD=${FSDD:-$REPO/../shared/data/fsdd/wav}
STARTED=$(date +%s)

log() { printf '[test_slurm %4ds] %s\n' "$(( $(date +%s) - STARTED ))" "$*"; }
fail() { log "FAIL: $*"; exit 1; }

[ "$(id -u)" = 0 ] || fail "run as root (it starts slurmctld, slurmd and munged)"
[ -d "$FSDD" ] || fail "no audio folder at $FSDD (set FSDD)"
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
        || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null; then
    log "installing slurm-wlm and munge (apt-get)"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi
log "$(slurmctld -V), $(munged -V 2>&1 | head -1), python $PYTHON"

SCRATCH=$(mktemp -d /tmp/fusefeat-slurm.XXXXXX)
chmod 755 "$SCRATCH"
mkdir -p "$SCRATCH"/{state,spool,logs,bin,munge}

stop_daemon() {  # by the pid in its pid file, never by name
    local pidfile=$1 pid
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile" 2>/dev/null || true)
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    set +e
    if [ -n "${SLURM_CONF:-}" ] && [ -f "$SLURM_CONF" ]; then
        local left
        left=$(squeue -h -o %A 2>/dev/null | sort -u)
        [ -n "$left" ] && scancel $left 2>/dev/null && sleep 1
    fi
    if [ "$rc" != 0 ]; then
        log "exit code $rc; the last lines of the logs:"
        for f in "$SCRATCH"/slurmctld.log "$SCRATCH"/slurmd.log "$SCRATCH"/logs/*; do
            [ -f "$f" ] && { echo "--- $f"; tail -n 15 "$f"; }
        done
    fi
    stop_daemon "$SCRATCH/slurmd.pid"
    stop_daemon "$SCRATCH/slurmctld.pid"
    stop_daemon "$SCRATCH/munge/munged.pid"
    if [ -n "${KEEP:-}" ]; then log "kept $SCRATCH"; else rm -rf "$SCRATCH"; fi
    log "$([ "$rc" = 0 ] && echo PASSED || echo FAILED) in $(( $(date +%s) - STARTED )) s"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- munge: its own key, socket, pid and log files, run as the munge user -----------------
dd if=/dev/urandom of="$SCRATCH/munge/munge.key" bs=1024 count=1 status=none
chown -R munge:munge "$SCRATCH/munge"
chmod 711 "$SCRATCH/munge"  # munged wants its socket folder searchable by all
chmod 400 "$SCRATCH/munge/munge.key"
MUNGE_SOCKET=$SCRATCH/munge/munge.socket
runuser -u munge -- munged --socket="$MUNGE_SOCKET" --key-file="$SCRATCH/munge/munge.key" \
    --pid-file="$SCRATCH/munge/munged.pid" --log-file="$SCRATCH/munge/munged.log" \
    --seed-file="$SCRATCH/munge/munged.seed"
for _ in $(seq 50); do [ -S "$MUNGE_SOCKET" ] && break; sleep 0.1; done
[ -S "$MUNGE_SOCKET" ] || fail "munged did not start"

# ---- slurm.conf ---------------------------------------------------------------------------
read -r CTLD_PORT SLURMD_PORT < <("$PYTHON" -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])')
NODE=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))
export SLURM_CONF=$SCRATCH/slurm.conf
cat > "$SLURM_CONF" <<EOF
ClusterName=fusefeatci
SlurmctldHost=$NODE
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$SCRATCH/state
SlurmdSpoolDir=$SCRATCH/spool
SlurmctldPidFile=$SCRATCH/slurmctld.pid
SlurmdPidFile=$SCRATCH/slurmd.pid
SlurmctldLogFile=$SCRATCH/slurmctld.log
SlurmdLogFile=$SCRATCH/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
KillWait=10
MinJobAge=3600
MailProg=/bin/true
NodeName=$NODE CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=ci Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
slurmctld -f "$SLURM_CONF" -i
slurmd -f "$SLURM_CONF"
for _ in $(seq 100); do
    [ "$(sinfo -h -o %T 2>/dev/null)" = idle ] && break
    sleep 0.2
done
[ "$(sinfo -h -o %T)" = idle ] || fail "the node is not idle: $(sinfo -h -o '%T %E')"
log "single-node SLURM up: node $NODE, $CPUS CPU(s), ports $CTLD_PORT/$SLURMD_PORT"

# ---- fusefeat, corpus, weights --------------------------------------------------------------
cat > "$SCRATCH/bin/fusefeat" <<EOF
#!/bin/sh
PYTHONPATH="$REPO\${PYTHONPATH:+:\$PYTHONPATH}" exec "$PYTHON" -m fusefeat "\$@"
EOF
chmod +x "$SCRATCH/bin/fusefeat"
export PATH=$SCRATCH/bin:$PATH OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
CORPUS=$SCRATCH/corpus
ls "$FSDD" | grep '\.wav$' | awk 'NR % 23 == 1' | head -n "$CLIPS" | while read -r name; do
    speaker=$(echo "$name" | cut -d_ -f2)
    mkdir -p "$CORPUS/$speaker"
    cp "$FSDD/$name" "$CORPUS/$speaker/"
done
[ "$(find "$CORPUS" -name '*.wav' | wc -l)" = "$CLIPS" ] || fail "could not copy $CLIPS clips"
CKPT=$SCRATCH/vggish_random.pth
PYTHONPATH=$REPO "$PYTHON" - "$CKPT" <<'EOF'
import sys
import torch
from fusefeat.backbones.vggish import VGGish
from fusefeat.config import load_preset
torch.manual_seed(1234)  # random weights, saved as torchvggish's release checkpoint is
torch.save(VGGish.build(load_preset("vggish"), random_init=True).net.state_dict(), sys.argv[1])
EOF
log "corpus: $CLIPS real clips (FSDD) in $(ls "$CORPUS" | wc -l) folders; random VGGish weights"

COMMON=(-m vggish -w "$CKPT" --shard-size 4 --batch-size 4 -q)
fusefeat extract "$CORPUS" "${COMMON[@]}" --num-workers 1 -o "$SCRATCH/single" \
    > "$SCRATCH/single.json"
log "single-process reference run: $(cat "$SCRATCH/single.json" | "$PYTHON" -c \
    'import json,sys; s=json.load(sys.stdin); print(s["status"], s["extracted"], "clips,", s["seconds"], "s")')"

# ---- the array --------------------------------------------------------------------------------
# The template as users copy it; only what this one-node CPU cluster lacks is overridden on the
# command line (sbatch options there win over #SBATCH lines): no GPU, little memory.
export PARTS=3 INPUTS=$CORPUS MODEL=vggish WEIGHTS=$CKPT
export EXTRA="--shard-size 4 --batch-size 4"
TEST_OPTS=(--gres=none --cpus-per-task=1 --mem=1500M --time=15 --chdir="$SCRATCH"
           --output="$SCRATCH/logs/%x-%A_%a.out")
TEMPLATE=scripts/slurm/extract_array.sbatch

wait_job() {  # until no task of the job is pending or running
    local job=$1
    for _ in $(seq 1800); do
        [ -z "$(squeue -h -j "$job" -t pending,running,completing,configuring 2>/dev/null)" ] && return 0
        sleep 0.2
    done
    fail "job $job did not finish in 6 minutes"
}

task_states() {  # "index state exitcode" for every task of array job $1
    scontrol -o show job "$1" | tr ' ' '\n' \
        | awk -F= '$1=="ArrayTaskId"{t=$2} $1=="JobState"{s=$2} $1=="ExitCode"{print t, s, $2}' \
        | sort -n
}

compare() {  # the merged file against the single-process run
    "$PYTHON" - "$1" "$SCRATCH/single" <<'EOF'
import sys
import numpy as np
import fusefeat
merged, single = fusefeat.load(sys.argv[1]), fusefeat.load(sys.argv[2])
assert merged.paths == single.paths, "different paths"
assert merged.paths == sorted(merged.paths) and len(set(merged.paths)) == len(merged.paths)
A, B = np.asarray(merged.embeddings), np.asarray(single.embeddings)
worst = max(float(np.linalg.norm(A[i] - B[i]) / np.linalg.norm(B[i])) for i in range(len(B)))
assert worst <= 1e-5, worst
print(f"{len(merged.paths)} paths identical and sorted, vectors equal "
      f"(worst relative difference {worst:.1e})")
EOF
}

cd "$REPO"
export OUT=$SCRATCH/array
JOB=$(sbatch --parsable "${TEST_OPTS[@]}" --array=0-2 "$TEMPLATE")
log "submitted array job $JOB (--array=0-2, PARTS=3) into $OUT"
wait_job "$JOB"
log "array job $JOB ended; tasks (index state exit):"
task_states "$JOB" | sed 's/^/    /'
[ "$(task_states "$JOB" | awk '$2=="COMPLETED" && $3=="0:0"' | wc -l)" = 3 ] \
    || fail "not every task completed"
fusefeat status "$OUT" | tee "$SCRATCH/status1.txt" | sed 's/^/    /'
grep -q "complete 3 " "$SCRATCH/status1.txt" || fail "status does not say 3 complete parts"
fusefeat merge "$OUT" -o "$SCRATCH/array.h5" > /dev/null
log "merged: $(compare "$SCRATCH/array.h5")"

# ---- cancel one task mid-run, resubmit it -----------------------------------------------------
# shards of 2 clips: the first commit comes early, most of the part is still to do when it does
export OUT=$SCRATCH/cancelled EXTRA="--shard-size 2 --batch-size 2"
JOB=$(sbatch --parsable "${TEST_OPTS[@]}" --array=0-2 "$TEMPLATE")
log "submitted array job $JOB into $OUT; waiting for task 1's first commit"
for _ in $(seq 6000); do
    compgen -G "$OUT/shard-p0001of0003-*.h5" > /dev/null && break
    sleep 0.05
done
compgen -G "$OUT/shard-p0001of0003-*.h5" > /dev/null || fail "task 1 never committed a shard"
scancel "${JOB}_1"
log "scancel ${JOB}_1 after $(ls "$OUT"/shard-p0001of0003-*.h5 | wc -l) shard(s) of part 1"
wait_job "$JOB"
task_states "$JOB" | sed 's/^/    /'
task_states "$JOB" | grep -q '^1 CANCELLED' \
    || fail "task 1 was not cancelled (did it finish before scancel? try a larger CLIPS)"
grep -h "SIGTERM\|CANCELLED" "$SCRATCH"/logs/*"${JOB}"_1.out | sed 's/^/    task 1 log: /'
fusefeat status "$OUT" | tee "$SCRATCH/status2.txt" | sed 's/^/    /'
grep -qE '^ +1  partial ' "$SCRATCH/status2.txt" || fail "status does not report part 1 partial"
COMMAND=$(fusefeat status "$OUT" --json | "$PYTHON" -c \
    'import json,sys; print(json.load(sys.stdin)["resubmit"]["command"])')
[ "$COMMAND" = "sbatch --array=1 --export=ALL,PARTS=3 $TEMPLATE" ] \
    || fail "unexpected resubmission command: $COMMAND"
log "running the command status printed: $COMMAND"
JOB=$(${COMMAND/sbatch /sbatch --parsable ${TEST_OPTS[*]} })
wait_job "$JOB"
task_states "$JOB" | sed 's/^/    /'
"$PYTHON" - "$OUT/parts/p0001of0003.json" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
assert m["status"] == "complete" and m["skipped"] > 0, m
print(f"    part 1 resumed: {m['skipped']} file(s) already committed were skipped, "
      f"{m['extracted']} extracted")
EOF
fusefeat status "$OUT" | tee "$SCRATCH/status3.txt" | sed 's/^/    /'
grep -q "complete 3 " "$SCRATCH/status3.txt" || fail "status does not say 3 complete parts"
fusefeat merge "$OUT" -o "$SCRATCH/cancelled.h5" > /dev/null
log "merged after cancel + resubmit: $(compare "$SCRATCH/cancelled.h5")"
