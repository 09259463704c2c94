"""Crash safety: SIGKILL at random moments (and at the dangerous ones: inside a shard write,
between fsync and rename, between rename and the directory fsync), SIGTERM and SIGINT; then the
same command again must give exactly what an uninterrupted run gives: the same paths, the same
vectors, no duplicates, every shard valid. Damaged shards are detected and redone.

The seed of the random kill moments is printed; FUSEFEAT_CRASH_SEED=N replays a run."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from conftest import FSDD, NSYNTH, REPO, fsdd_by_speaker, run_cli, summary_of

import fusefeat

CLIPS = 300


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    names = sorted(os.listdir(FSDD))[::10][:CLIPS]
    return fsdd_by_speaker(tmp_path_factory.mktemp("corpus"), names)


@pytest.fixture(scope="module")
def job(corpus, random_checkpoints, tmp_path_factory):
    args = ["extract", corpus, "-m", "vggish", "-w", random_checkpoints("vggish"),
            "--shard-size", "17", "--batch-size", "8", "--num-workers", "1", "-q"]
    reference = tmp_path_factory.mktemp("reference") / "out"
    start = time.monotonic()
    run_cli(*args, "-o", reference, check=0)
    return args, reference, time.monotonic() - start


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "2"
    return env


def _start(args, out, **env_extra):
    env = _env()
    env.update(env_extra)
    return subprocess.Popen([sys.executable, "-m", "fusefeat", *map(str, args), "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def committed_paths(out) -> list[str]:
    """Check every committed shard with plain h5py; return all their paths."""
    paths = []
    for shard in sorted(out.glob("shard-*.h5")):
        with h5py.File(shard, "r") as f:
            assert int(f.attrs["complete"]) == 1, shard
            rows = int(f.attrs["rows"])
            assert f["embeddings"].shape[0] == rows == f["path"].shape[0], shard
            assert np.isfinite(f["embeddings"][:]).all(), shard
            paths += list(f["path"].asstr()[:])
    assert len(paths) == len(set(paths)), "a path was committed twice"
    return paths


def same_as_reference(out, reference):
    got, want = fusefeat.load(out), fusefeat.load(reference)
    assert got.paths == want.paths
    assert len(got.paths) == CLIPS
    A, B = np.asarray(got.embeddings), np.asarray(want.embeddings)
    # batches after a resume hold other clips; batched convolutions round differently (<= 1e-6)
    worst = max(float(np.linalg.norm(A[i] - B[i]) / np.linalg.norm(B[i])) for i in range(len(A)))
    assert worst <= 1e-5, worst
    committed_paths(out)
    return worst


def test_sigkill_at_random_and_dangerous_moments(tmp_path, job):
    args, reference, duration = job
    seed = int(os.environ.get("FUSEFEAT_CRASH_SEED", time.time_ns() % 2**31))
    print(f"\ncrash seed: {seed} (replay with FUSEFEAT_CRASH_SEED={seed})")
    rng = random.Random(seed)
    faults = [("fault", point, rng.randint(1, 2)) for point in
              ("rows_written", "before_complete", "before_rename", "after_rename")]
    out = tmp_path / "out"
    exercised, attempts = [], 0
    # faults at fixed positions among random-time kills; a time kill lands anywhere from process
    # start (imports, model loading) to well into the extraction
    slots = set(rng.sample(range(12), len(faults)))
    while len(exercised) < 12 and attempts < 30:
        kind, point, value = (faults.pop(0) if attempts in slots and faults else
                              ("time", None, rng.uniform(0.3, duration * rng.choice((0.1, 0.3)))))
        attempts += 1
        if kind == "fault":
            proc = _start(args, out, FUSEFEAT_FAULT=f"{point}:{value}")
            proc.communicate(timeout=600)
            killed = proc.returncode == -signal.SIGKILL
        else:
            proc = _start(args, out)
            try:
                proc.communicate(timeout=value)
                killed = False
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                killed = True
        done = len(committed_paths(out)) if out.exists() else 0
        print(f"  {kind} {point or ''} {value:.2f}: {'killed' if killed else 'finished'}, "
              f"{done} committed, {len(list(out.glob('.tmp.*')))} temporary file(s) left")
        if killed:
            exercised.append((kind, point, value))
        if done == CLIPS:
            break
    assert len(exercised) >= 10, exercised
    assert {p for k, p, _ in exercised if k == "fault"} >= {"before_rename", "after_rename"}
    final = summary_of(run_cli(*args, "-o", out, check=0))
    assert final["status"] == "complete"
    worst = same_as_reference(out, reference)
    assert not list(out.glob(".tmp.*")), "temporary files of dead runs are cleaned up"
    print(f"kill points exercised: {len(exercised)}; worst relative difference {worst:.2e}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_sigint_commit_and_exit_resumable(tmp_path, job, sig):
    args, reference, _ = job
    out = tmp_path / "out"
    proc = _start(args, out)
    deadline = time.monotonic() + 300
    while not list(out.glob("shard-*.h5")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, sig)  # the whole process group, as a terminal or SLURM does
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 75, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["status"] == "interrupted" and summary["failed"] == 0
    assert summary["pending"] > 0 and "resume" in stderr
    committed = committed_paths(out)
    assert len(committed) >= summary["extracted"] > 0  # everything finished was committed
    final = summary_of(run_cli(*args, "-o", out, check=0))
    assert final["skipped"] == len(committed)
    same_as_reference(out, reference)


def test_damaged_shards_are_set_aside_and_redone(tmp_path, job):
    args, reference, _ = job
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    shards = sorted(out.glob("shard-*.h5"))
    data = shards[0].read_bytes()
    shards[0].write_bytes(data[: len(data) // 2])  # truncated
    shards[1].write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(4096))  # garbage with an HDF5 magic
    with h5py.File(shards[2], "r+") as f:  # valid HDF5, but never completed
        f.attrs["complete"] = 0
    result = run_cli(*args, "-o", out, check=0)
    summary = summary_of(result)
    assert summary["extracted"] == 3 * 17
    assert "quarantine" in result.stderr
    assert len(list((out / "quarantine").iterdir())) == 3
    same_as_reference(out, reference)


def test_two_writers_of_the_same_part_do_not_collide(tmp_path, job):
    args, reference, _ = job
    out = tmp_path / "out"
    first = _start(args, out)
    deadline = time.monotonic() + 120
    while not (out / ".lock-p0000of0001").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    second = run_cli(*args, "-o", out)
    first.communicate(timeout=600)
    assert first.returncode == 0
    if second.returncode != 0:  # refused while the first held the lock
        assert second.returncode == 1 and "another fusefeat process" in second.stderr
    same_as_reference(out, reference)


ORPHAN = """
import os, signal, sys, time
from fusefeat.loader import DecodePool, DecodeTask
from fusefeat.windows import Geometry
files = sorted(os.listdir(sys.argv[1]))[:20]  # 4 s at 16 kHz: one segment fills a pipe
tasks = [DecodeTask(i, name, os.path.join(sys.argv[1], name)) for i, name in enumerate(files)]
geometry = Geometry(sample_rate=16000, window=160000, align=160, context=0, lookahead=0,
                    min_samples=16000)
pool = iter(DecodePool(tasks, geometry, workers=1, prefetch_mb=64))
next(pool)
time.sleep(3)  # the worker decodes ahead: its share of segments fills the results pipe
print("killing myself", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_decode_workers_of_a_killed_run_exit_and_release_its_output():
    """A run killed alone (not its process group) leaves decode workers with segments that
    nobody will read; they must exit at once, not hold the run's stdout/stderr open forever."""
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", ORPHAN, str(NSYNTH)], env=_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL and "killing myself" in result.stdout
    assert time.monotonic() - start < 60
