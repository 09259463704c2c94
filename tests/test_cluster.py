"""Cluster scale without a cluster: the --shard I/N split, SLURM array variables, several
device workers, `fusefeat status`, and merging the parts. scripts/test_slurm.sh proves the
same on a real SLURM; these tests keep the logic checked in the suite (no SLURM, no GPU)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import FSDD, REPO, fsdd_by_speaker, run_cli, summary_of

import fusefeat
from fusefeat.discover import discover, part_of, select_part
from fusefeat.store import layout
from fusefeat.store.status import array_spec, part_status, render

FSDD_NAMES = sorted(os.listdir(FSDD))
CLIPS = 12


# ---- the split ---------------------------------------------------------------------------------
def _keys(n=3000):
    return [f"{name.split('_')[1]}/{name}" for name in FSDD_NAMES[:n]]


@pytest.mark.parametrize("parts", [2, 3, 7, 10, 64])
def test_parts_are_disjoint_complete_and_balanced(parts):
    keys = _keys()
    files = discover(files_from="-", stdin=_stdin(keys)).files
    chosen = [select_part(files, i, parts) for i in range(parts)]
    flat = [f.key for part in chosen for f in part]
    assert sorted(flat) == sorted(keys) and len(set(flat)) == len(keys)  # complete, disjoint
    sizes = [len(p) for p in chosen]
    mean = len(keys) / parts
    # a hash split is balanced in expectation: binomial spread, sd = sqrt(mean (1 - 1/N))
    assert max(abs(s - mean) for s in sizes) <= 4 * (mean * (1 - 1 / parts)) ** 0.5 + 1, sizes
    for part in chosen:  # each part keeps the sorted (input) order
        assert [f.key for f in part] == sorted(f.key for f in part)


def test_split_ignores_listing_order_hash_seed_and_other_files():
    keys = _keys(600)
    expected = {k: part_of(k, 7) for k in keys}
    shuffled = keys[:]
    random.Random(3).shuffle(shuffled)
    files = discover(files_from="-", stdin=_stdin(shuffled)).files
    assert [f.key for f in files] == sorted(keys)
    assert {f.key: i for i in range(7) for f in select_part(files, i, 7)} == expected
    for i in range(7):  # the part kept while reading the list is the same part
        assert discover(files_from="-", stdin=_stdin(shuffled), part=(i, 7)).files == \
            select_part(files, i, 7)
    # adding or removing files moves no other file to another part
    fewer = discover(files_from="-", stdin=_stdin(keys[::3] + ["new/extra.wav"])).files
    for i in range(7):
        for f in select_part(fewer, i, 7):
            assert f.key == "new/extra.wav" or expected[f.key] == i
    # another interpreter, another hash seed: the same parts
    code = ("import sys, json; from fusefeat.discover import part_of; "
            "print(json.dumps([part_of(k, 7) for k in sys.stdin.read().split()]))")
    for seed in ("0", "12345", "random"):
        env = dict(os.environ, PYTHONHASHSEED=seed,
                   PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        out = subprocess.run([sys.executable, "-c", code], input="\n".join(keys), env=env,
                             capture_output=True, text=True, check=True).stdout
        assert json.loads(out) == [expected[k] for k in keys]


def test_long_lists_are_streamed_in_both_formats(tmp_path):
    keys = [f"dir{i % 97}/clip {i:07d}.wav" for i in range(60000)]  # > 2 MiB: several chunks
    for null in (False, True):
        listing = tmp_path / f"list{int(null)}"
        sep = "\0" if null else "\r\n"
        listing.write_bytes((sep.join(keys) + sep + sep).encode())
        found = discover(files_from=str(listing), null_separated=null)
        assert [f.key for f in found.files] == sorted(keys)
        part = discover(files_from=str(listing), null_separated=null, part=(2, 5)).files
        assert part == select_part(found.files, 2, 5)


def _stdin(keys):
    import io

    return io.StringIO("\n".join(keys) + "\n")


# ---- SLURM array variables ---------------------------------------------------------------------
@pytest.mark.parametrize("env, expected", [
    ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "0",
      "SLURM_ARRAY_TASK_STEP": "1"}, (2, 3)),
    ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "3"},
     (1, 3)),  # --array=3-5
    ({"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "5",
      "SLURM_ARRAY_TASK_STEP": "2"}, (2, 3)),  # --array=5-9:2
    ({}, None),  # not an array task
])
def test_shard_from_slurm_array_variables(monkeypatch, tmp_path, env, expected):
    from fusefeat.cli import _slurm_shard

    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN",
                 "SLURM_ARRAY_TASK_STEP"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert _slurm_shard(str(tmp_path / "out")) == expected


def test_slurm_variables_that_cannot_give_a_part_are_refused(tmp_path):
    base = {"SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_STEP": "1"}
    args = ["extract", FSDD, "-m", "vggish", "-o", tmp_path / "out"]
    no_count = run_cli(*args, env={**base, "SLURM_ARRAY_TASK_ID": "1"})
    assert no_count.returncode == 2 and "SLURM_ARRAY_TASK_COUNT" in no_count.stderr
    assert "--shard" in no_count.stderr
    # a directory split in 10 parts, and an array of 2 (a resubmission of 2 indices?)
    (tmp_path / "out" / "parts").mkdir(parents=True)
    (tmp_path / "out" / "parts" / "p0003of0010.json").write_text('{"status": "interrupted"}')
    subset = run_cli(*args, env={**base, "SLURM_ARRAY_TASK_ID": "1",
                                 "SLURM_ARRAY_TASK_COUNT": "2"})
    assert subset.returncode == 2 and "split into 10 parts" in subset.stderr
    assert "--shard $SLURM_ARRAY_TASK_ID/10" in subset.stderr and "Traceback" not in subset.stderr
    overwrite = run_cli(*args, "--shard", "1/3", "--overwrite")
    assert overwrite.returncode == 2 and "--overwrite" in overwrite.stderr


# ---- status on synthetic shards (no model) ----------------------------------------------------
def _write_part(out, keys, part, parts, marker=None, errors=(), device=None):
    from fusefeat.errors import FileFailure
    from fusefeat.store.writer import Row, Schema, ShardWriter

    schema = Schema(dim=4, layer_dims={}, baseline_dim=None, frames_dim=None)
    attrs = {"model": "synthetic", "dim": 4, "layers": "[1]", "fingerprint": "f",
             "fingerprint_fields": "{}", "layer_dims": "{}", "part": f"{part}/{parts}"}
    writer = ShardWriter(out, layout.Slot(part, parts, device), layout.new_run_id(), attrs,
                         schema, shard_size=3)
    for key in keys:
        writer.add_row(Row(key, np.ones(4, np.float32), 1.0, 8000, 1, 10, 1))
    for key in errors:
        writer.add_error(FileFailure(key, "decode", "AudioError", "unreadable"))
    writer.commit()
    if marker is not None:
        (out / "parts").mkdir(exist_ok=True)
        data = {"part": part, "parts": parts, "device_slot": device, **marker}
        (out / "parts" / f"{layout.Slot(part, parts, device).label}.json").write_text(
            json.dumps(data))


def test_status_of_complete_partial_failed_missing_running_parts(tmp_path):
    from fusefeat.store.lock import SlotLock

    out = tmp_path / "out"
    out.mkdir()
    parts = 6
    keys = _keys(120)
    by_part = {i: [k for k in keys if part_of(k, parts) == i] for i in range(parts)}
    _write_part(out, by_part[0], 0, parts, {"status": "complete", "files": len(by_part[0])})
    _write_part(out, by_part[1][:4], 1, parts, {"status": "interrupted", "files": len(by_part[1])})
    _write_part(out, by_part[2][:3], 2, parts, {"status": "error", "files": len(by_part[2]),
                                                "error": "OutputError: disk full"})
    # part 3: never ran; part 4: killed (its "running" marker stayed, nobody holds its lock)
    _write_part(out, by_part[4][:2], 4, parts, {"status": "running", "files": len(by_part[4])})
    # part 5: complete with two failed files, by two device workers
    half = len(by_part[5]) // 2
    _write_part(out, by_part[5][2:half], 5, parts, None, errors=by_part[5][:2], device=0)
    _write_part(out, by_part[5][half:], 5, parts, None, device=1)
    (out / "parts" / "p0005of0006.json").write_text(json.dumps(
        {"status": "partial", "files": len(by_part[5]), "part": 5, "parts": parts}))

    report = part_status(out)  # N from what the directory records
    states = {r["part"]: r["state"] for r in report["part_list"]}
    assert states == {0: "complete", 1: "partial", 2: "failed", 3: "missing", 4: "partial",
                      5: "complete"}
    row = report["part_list"][1]
    assert (row["committed"], row["pending"], row["shards"]) == (4, len(by_part[1]) - 4, 2)
    assert report["part_list"][5]["failed_files"] == 2
    assert report["part_list"][5]["shards"] == len(list(out.glob("shard-p0005of0006-d*.h5")))
    assert report["part_list"][2]["error"] == "OutputError: disk full"
    assert report["resubmit"]["command"] == (
        "sbatch --array=1-4 --export=ALL,PARTS=6 scripts/slurm/extract_array.sbatch")
    assert report["retry_failed"]["command"] == (
        "sbatch --array=5 --export=ALL,PARTS=6,RETRY_FAILED=1 scripts/slurm/extract_array.sbatch")
    text = render(report)
    assert "complete 2   running 0   partial 2   failed 1   missing 1" in text
    assert "disk full" in text and report["resubmit"]["command"] in text

    with SlotLock(out, layout.Slot(1, parts).label):  # a writer at work on part 1
        again = part_status(out, parts=parts, script="my.sbatch")
    assert again["part_list"][1]["state"] == "running"
    assert again["part_list"][1]["holder"] == layout.host_and_pid()
    assert again["resubmit"]["command"] == "sbatch --array=2-4 --export=ALL,PARTS=6 my.sbatch"

    result = run_cli("status", out, "--json", check=0)  # the CLI: library + JSON
    assert json.loads(result.stdout)["counts"] == report["counts"]
    assert "--array=1-4" in run_cli("status", out, check=0).stdout
    several = run_cli("status", out, "--shards", "3", check=0)
    assert "partial 3" in several.stdout  # rows, but no 3-way run ever reported: unfinished
    _write_part(out, keys[:1], 0, 1)  # now a second split (1 part) in the same directory
    ambiguous = run_cli("status", out)
    assert ambiguous.returncode == 2 and "--shards" in ambiguous.stderr


def test_array_spec():
    assert array_spec([9, 1, 4, 5, 6]) == "1,4-6,9"
    assert array_spec([0]) == "0" and array_spec([]) == ""


# ---- the real thing, run as users run it -------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return fsdd_by_speaker(tmp_path_factory.mktemp("cluster") / "wavs",
                           FSDD_NAMES[::250][:CLIPS])


@pytest.fixture(scope="module")
def single(corpus, random_checkpoints, tmp_path_factory):
    args = ["extract", corpus, "-m", "vggish", "-w", random_checkpoints("vggish"),
            "--shard-size", "2", "--batch-size", "2", "--num-workers", "1", "-q"]
    out = tmp_path_factory.mktemp("single") / "out"
    run_cli(*args, "-o", out, check=0)
    return args, out


def same_rows(out, reference):
    got, want = fusefeat.load(out), fusefeat.load(reference)
    assert got.paths == want.paths and len(got.paths) == CLIPS
    A, B = np.asarray(got.embeddings), np.asarray(want.embeddings)
    worst = max(float(np.linalg.norm(A[i] - B[i]) / np.linalg.norm(B[i])) for i in range(len(B)))
    assert worst <= 1e-5, worst  # other batches, other float rounding (<= 1e-6 seen)


def test_array_of_parts_then_status_resubmit_and_merge(tmp_path, single):
    args, reference = single
    out = tmp_path / "out"
    first = summary_of(run_cli(*args, "-o", out, "--shard", "0/3", check=0))
    assert first["status"] == "complete"
    # part 1 is killed (SIGKILL) right after its first commit, as a node failure would do
    killed = run_cli(*args, "-o", out, "--shard", "1/3", env={"FUSEFEAT_FAULT": "after_rename:1"})
    assert killed.returncode == -signal.SIGKILL
    report = json.loads(run_cli("status", out, "--json", check=0).stdout)
    assert [r["state"] for r in report["part_list"]] == ["complete", "partial", "missing"]
    assert report["resubmit"]["command"] == (
        "sbatch --array=1-2 --export=ALL,PARTS=3 scripts/slurm/extract_array.sbatch")
    # the resubmitted tasks: part 1 by --shard, part 2 from the SLURM array variables
    resumed = summary_of(run_cli(*args, "-o", out, "--shard", "1/3", check=0))
    assert resumed["skipped"] == 2 and resumed["extracted"] == resumed["files"] - 2
    slurm = {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3",
             "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_STEP": "1",
             "SLURM_ARRAY_JOB_ID": "77", "SLURM_JOB_ID": "80"}
    third = run_cli(*args, "-o", out, env=slurm, check=0)
    assert "--shard 2/3" in third.stderr
    marker = json.loads((out / "parts" / "p0002of0003.json").read_text())
    assert marker["status"] == "complete" and marker["slurm"]["array_task_id"] == "2"
    assert first["files"] + resumed["files"] + summary_of(third)["files"] == CLIPS
    text = run_cli("status", out, check=0).stdout
    assert "complete 3 " in text and "every part is complete" in text
    assert {p.name.split("-")[1] for p in out.glob("shard-*.h5")} == {
        "p0000of0003", "p0001of0003", "p0002of0003"}
    merged = tmp_path / "merged.h5"
    assert json.loads(run_cli("merge", out, "-o", merged, check=0).stdout)["rows"] == CLIPS
    same_rows(merged, reference)
    info = json.loads(run_cli("info", out, "--json", check=0).stdout)
    assert info["committed"] == CLIPS and info["pending"] == 0


def test_devices_one_worker_each_forwarded_sigterm_and_resume(tmp_path, single):
    args, reference = single
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "fusefeat", *map(str, args), "-o", str(out),
                             "--devices", "cpu,cpu", "--batch-size", "1", "--shard-size", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 300
    while not list(out.glob("shard-*-d*.h5")) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # to the parent only, as SLURM's --signal=B:TERM does
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 75, stderr
    stopped = json.loads(stdout.strip().splitlines()[-1])
    assert stopped["status"] == "interrupted" and stopped["files"] == CLIPS
    assert stopped["pending"] > 0 and "asking the device workers" in stderr
    final = summary_of(run_cli(*args, "-o", out, "--devices", "cpu,cpu", check=0))
    assert final["status"] == "complete" and final["files"] == CLIPS
    assert final["skipped"] == CLIPS - final["extracted"] >= stopped["extracted"]
    slots = {layout.parse_shard_name(p.name).group("slot") for p in out.glob("shard-*.h5")}
    assert slots == {"p0000of0001-d0", "p0000of0001-d1"}
    marker = json.loads((out / "parts" / "p0000of0001.json").read_text())
    assert [d["device"] for d in marker["devices"]] == ["cpu", "cpu"]
    assert sum(d["files"] for d in marker["devices"]) == CLIPS
    assert not list(out.glob(".tmp.*"))
    same_rows(out, reference)
    report = part_status(out)
    assert report["counts"]["complete"] == 1 and report["committed"] == CLIPS
