#!/usr/bin/env python3
"""Scale on paper, measured: the bookkeeping of a 1,000,000-clip corpus, without any model.

    python scripts/scale_sim.py [--files 1000000] [--parts 100] [--rows-per-shard 1000]
                                [--workdir DIR] [--keep]

Stages, each in a fresh Python process so that its peak memory is its own:
  listing   discover(files_from=LIST) over a synthetic file list (the files need not exist)
  assign    select_part for one array task (N = --parts), and the part of every file
            (balance of the split, by count)
  scan      the resume scan over all the committed rows (--files rows in shards of
            --rows-per-shard, written with the real ShardWriter, dim 8), as info, status,
            merge and load do
  resume    what one array task does before its first batch: discover, select its part,
            scan the shards that can hold its files, choose what is left to do
  status    `fusefeat status`'s library over the same directory
  load      fusefeat.load: the paths in order and one column, as merge does first

Prints one line per stage (seconds, peak RSS of the process, and the part of it that the
stage added over the interpreter with its imports) and a JSON summary at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def synthetic_key(i: int) -> str:
    # nested like a real corpus: 1000 speakers/sources, 100 sessions each
    return f"corpus/src{i % 1000:04d}/sess{(i // 1000) % 100:03d}/clip_{i:08d}.flac"


# ---- stages (run in a child process) ---------------------------------------------------------
def stage_listing(args) -> dict:
    from fusefeat.discover import discover

    before = _rss_mb("VmRSS")
    start = time.perf_counter()
    found = discover(files_from=args.listing)
    seconds = time.perf_counter() - start
    assert len(found.files) == args.files, len(found.files)
    return {"seconds": seconds, "base_mb": before, "files": len(found.files)}


def stage_assign(args) -> dict:
    from collections import Counter

    from fusefeat.discover import discover, part_of, select_part

    found = discover(files_from=args.listing)
    before = _rss_mb("VmRSS")
    start = time.perf_counter()
    mine = select_part(found.files, 7 % args.parts, args.parts)
    one_task = time.perf_counter() - start
    start = time.perf_counter()
    counts = Counter(part_of(f.key, args.parts) for f in found.files)
    every = time.perf_counter() - start
    sizes = [counts.get(p, 0) for p in range(args.parts)]
    mean = args.files / args.parts
    return {"seconds": one_task, "seconds_all_parts": every, "base_mb": before,
            "part_files": len(mine), "parts": args.parts,
            "part_min": min(sizes), "part_max": max(sizes),
            "imbalance_max_over_mean": max(sizes) / mean - 1}


def stage_scan(args) -> dict:
    """The whole directory: what `info`, `status`, `merge` and `load` read."""
    from fusefeat.store.scan import scan

    before = _rss_mb("VmRSS")
    start = time.perf_counter()
    state = scan(args.shards_dir, quarantine=False)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "base_mb": before, "rows": len(state.latest),
            "shards": len(state.shards)}


def stage_resume(args) -> dict:
    """What one array task does at start: discover, select its part, scan (its part's shards
    and those of other splits only), choose what is left to do."""
    from fusefeat.pipeline import ExtractOptions, _select_todo, discover_part
    from fusefeat.store.scan import scan

    before = _rss_mb("VmRSS")
    part = 7 % args.parts
    start = time.perf_counter()
    mine, _, _ = discover_part([], part, args.parts, files_from=str(args.listing))
    listed = time.perf_counter() - start
    state = scan(args.shards_dir, quarantine=False, part=(part, args.parts))
    todo, skipped = _select_todo(mine, state, ExtractOptions(), log=print)
    seconds = time.perf_counter() - start
    assert not todo and skipped == len(mine), (len(todo), skipped)
    return {"seconds": seconds, "seconds_listing_and_split": listed, "base_mb": before,
            "part_files": len(mine), "shards_read": len(state.shards)}


def stage_status(args) -> dict:
    from fusefeat.store.status import part_status

    before = _rss_mb("VmRSS")
    start = time.perf_counter()
    report = part_status(args.shards_dir, parts=args.parts)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "base_mb": before, "states": report["counts"]}


def stage_load(args) -> dict:
    import fusefeat

    before = _rss_mb("VmRSS")
    start = time.perf_counter()
    feats = fusefeat.load(args.shards_dir)
    n = len(feats.paths)
    feats.close()
    return {"seconds": time.perf_counter() - start, "base_mb": before, "rows": n}


STAGES = {"listing": stage_listing, "assign": stage_assign, "scan": stage_scan,
          "resume": stage_resume, "status": stage_status, "load": stage_load}


# ---- the parent -------------------------------------------------------------------------------
def build_listing(path: Path, files: int) -> float:
    start = time.perf_counter()
    order = list(range(files))
    # listed in a scrambled order, as a file system or `find` might: discovery must sort
    order = order[1::2] + order[::2]
    with open(path, "w", encoding="utf-8") as handle:
        for i in order:
            handle.write(synthetic_key(i) + "\n")
    return time.perf_counter() - start


def build_shards(directory: Path, files: int, parts: int, rows_per_shard: int) -> float:
    """Committed shards in the real format, written by the real ShardWriter (dim 8)."""
    import numpy as np

    from fusefeat.discover import part_of
    from fusefeat.store import layout
    from fusefeat.store.writer import Row, Schema, ShardWriter

    start = time.perf_counter()
    directory.mkdir(parents=True)
    by_part: list[list[str]] = [[] for _ in range(parts)]
    for i in range(files):
        key = synthetic_key(i)
        by_part[part_of(key, parts)].append(key)
    schema = Schema(dim=8, layer_dims={}, baseline_dim=None, frames_dim=None)
    attrs = {"model": "synthetic", "dim": 8, "layers": "[1, 2]", "fingerprint": "sim",
             "fingerprint_fields": "{}", "layer_dims": "{}"}
    vector = np.arange(8, dtype=np.float32)
    for part, keys in enumerate(by_part):
        attrs["part"] = f"{part}/{parts}"
        writer = ShardWriter(directory, layout.Slot(part, parts), layout.new_run_id(), attrs,
                             schema, shard_size=rows_per_shard, commit_seconds=1e9)
        for key in sorted(keys):
            writer.add_row(Row(key, vector, 1.0, 16000, 1, 1000, 1))
        writer.commit()
        marker = {"status": "complete", "files": len(keys), "extracted": len(keys),
                  "failed": 0, "failed_total": 0, "pending": 0, "part": part, "parts": parts,
                  "device_slot": None}
        (directory / layout.PARTS).mkdir(exist_ok=True)
        (directory / layout.PARTS / f"{layout.Slot(part, parts).label}.json").write_text(
            json.dumps(marker))
    return time.perf_counter() - start


def run_stage(name: str, args) -> dict:
    command = [sys.executable, __file__, "--stage", name, "--files", str(args.files),
               "--parts", str(args.parts), "--listing", str(args.listing),
               "--shards-dir", str(args.shards_dir)]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"stage {name} failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--parts", type=int, default=100, help="N of --shard I/N")
    parser.add_argument("--rows-per-shard", type=int, default=1000)
    parser.add_argument("--workdir", type=Path, help="reuse (or keep) the listing and shards here")
    parser.add_argument("--keep", action="store_true", help="keep a temporary --workdir")
    parser.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    parser.add_argument("--listing", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--shards-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.stage:  # a child: one measured stage
        cpu = time.process_time()
        result = STAGES[args.stage](args)
        result["cpu_seconds_process"] = time.process_time() - cpu  # stage + its own setup
        result["peak_mb"] = _rss_mb("VmHWM")
        result["added_mb"] = result["peak_mb"] - result.pop("base_mb")
        print(json.dumps(result))
        return

    temporary = args.workdir is None
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fusefeat-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    args.listing = workdir / f"list-{args.files}.txt"
    args.shards_dir = workdir / f"out-{args.files}-{args.parts}-{args.rows_per_shard}"
    setup = {}
    try:
        if not args.listing.exists():
            setup["listing_written_s"] = round(build_listing(args.listing, args.files), 1)
        if not args.shards_dir.exists():
            print(f"writing {args.files} committed rows in shards of {args.rows_per_shard} "
                  f"(once; reused with --workdir) ...", file=sys.stderr, flush=True)
            setup["shards_written_s"] = round(
                build_shards(args.shards_dir, args.files, args.parts, args.rows_per_shard), 1)
        results = {}
        print(f"{args.files} files, --shard I/{args.parts}, shards of {args.rows_per_shard} rows; "
              f"{os.cpu_count()} CPU(s), load average {os.getloadavg()[0]:.1f}")
        print("  (seconds: wall clock of the stage; cpu_seconds_process: CPU time of its "
              "process, setup included)")
        for name in STAGES:
            r = run_stage(name, args)
            results[name] = r
            extra = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
                     if k not in ("seconds", "peak_mb", "added_mb")}
            print(f"  {name:<8} {r['seconds']:7.2f} s   peak RSS {r['peak_mb']:6.0f} MB "
                  f"(+{r['added_mb']:.0f} MB over imports)   {json.dumps(extra)}", flush=True)
        print(json.dumps({"files": args.files, "parts": args.parts, "setup": setup,
                          "stages": results}))
    finally:
        if temporary and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
