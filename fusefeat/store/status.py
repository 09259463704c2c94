"""`fusefeat status DIR [--shards N]`: the state of each part of a split run (--shard I/N, a
SLURM array), and the command that resubmits only the unfinished ones.

What it reads:
- `parts/pIIIIofNNNN.json`, the marker each run of a part writes when it starts ("running")
  and when it ends (its summary: "complete", "partial" when some files failed, "interrupted",
  or "error" with the message of a fatal error);
- the committed shards: every committed row or error record is counted in the part its path
  belongs to (`part_of(path, N)`), whichever run wrote it;
- the parts' locks (`.lock-pIIIIofNNNN[-dD]`): a part whose lock is held is being written now.

States:
  complete  its last run finished and every file of the part is committed or recorded as
            failed (`failed_files` says how many failed: --retry-failed tries them again)
  running   a process holds the part's lock now
  partial   some of it is committed, but its last run was interrupted (exit 75: a signal, the
            time limit), killed (scancel after KillWait, node failure, out of memory) or has
            not finished: resubmitting resumes it
  failed    its last run stopped on a fatal error (exit 1); the marker keeps the message
  missing   nothing from it: never started, or died before its first commit
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from fusefeat.discover import part_of
from fusefeat.errors import UsageError
from fusefeat.store import layout
from fusefeat.store.lock import holder_of
from fusefeat.store.scan import scan

STATES = ("complete", "running", "partial", "failed", "missing")
RESUBMIT = ("partial", "failed", "missing")
DEFAULT_SCRIPT = "scripts/slurm/extract_array.sbatch"


def read_markers(directory: Path) -> dict:
    """label -> marker, for every readable parts/*.json."""
    markers = {}
    parts_dir = Path(directory) / layout.PARTS
    if parts_dir.is_dir():
        for path in sorted(parts_dir.glob("p*.json")):
            try:
                markers[path.stem] = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
    return markers


def recorded_splits(directory: Path) -> set[int]:
    """The N of every --shard I/N that wrote to `directory` (markers and shard names); cheap:
    no HDF5 file is opened."""
    splits = set()
    for label in read_markers(directory):
        slot = layout.parse_slot(label)
        if slot is not None:
            splits.add(slot.parts)
    for path in layout.committed_shards(Path(directory)):
        match = layout.parse_shard_name(path.name)
        slot = layout.parse_slot(match.group("slot")) if match else None
        if slot is not None:
            splits.add(slot.parts)
    return splits


def infer_parts(directory: Path) -> int:
    splits = recorded_splits(directory)
    if not splits:
        raise UsageError(f"{directory} records no parts yet",
                         hint="pass --shards N (the N of --shard I/N, the array size)")
    if len(splits) > 1:
        raise UsageError(f"{directory} holds parts of several splits (N = "
                         f"{', '.join(str(n) for n in sorted(splits))})",
                         hint="pass --shards N to say which split to report on")
    return splits.pop()


def part_status(directory: str | Path, parts: int | None = None, probe_locks: bool = True,
                script: str = DEFAULT_SCRIPT) -> dict:
    directory = Path(directory)
    if not directory.is_dir():
        raise UsageError(f"{directory} is not a directory")
    parts = parts or infer_parts(directory)
    if parts < 1:
        raise UsageError("--shards must be at least 1")
    markers = read_markers(directory)
    state = scan(directory, quarantine=False, warn=lambda message: None)
    committed, failed, shards = Counter(), Counter(), Counter()
    if parts > 1:
        committed.update(part_of(key, parts) for key, v in state.latest.items() if v[1] >= 0)
        failed.update(part_of(key, parts) for key in state.failures)
    else:
        committed[0], failed[0] = len(state.latest) - len(state.failures), len(state.failures)
    for info in state.shards:
        slot = layout.parse_slot(info.slot)
        if slot is not None and slot.parts == parts:
            shards[slot.part] += 1
    holders = _lock_holders(directory, parts) if probe_locks else {}

    rows = []
    for part in range(parts):
        label = layout.Slot(part, parts).label
        marker = markers.get(label)
        files = marker.get("files") if marker else None
        done, bad = committed[part], failed[part]
        last = marker.get("status") if marker else None
        if part in holders:
            state_ = "running"
        elif marker is None:
            state_ = "partial" if done or bad or shards[part] else "missing"
        elif last in ("complete", "partial"):  # "partial": finished, some files failed
            state_ = "complete" if files is None or done + bad >= files else "partial"
        elif last == "error":
            state_ = "failed"
        else:  # "interrupted", or "running" with nobody holding the lock: killed
            state_ = "partial" if done or bad or shards[part] else "missing"
        rows.append({
            "part": part, "label": label, "state": state_, "files": files,
            "committed": done, "failed_files": bad,
            "pending": max(0, files - done - bad) if files is not None else None,
            "shards": shards[part], "last_run": last,
            "updated_unix": marker.get("updated_unix") if marker else None,
            "host": marker.get("host") if marker else None,
            "slurm": marker.get("slurm") if marker else None,
            "holder": holders.get(part),
            "error": marker.get("error") if marker and last == "error" else None,
        })
    counts = Counter(r["state"] for r in rows)
    redo = [r["part"] for r in rows if r["state"] in RESUBMIT]
    retry = [r["part"] for r in rows if r["state"] == "complete" and r["failed_files"]]
    known = [r["files"] for r in rows if r["files"] is not None]
    return {
        "directory": str(directory), "parts": parts,
        "counts": {s: counts.get(s, 0) for s in STATES},
        "files": sum(known) if len(known) == parts else None,
        "committed": sum(committed.values()), "failed_files": sum(failed.values()),
        "shards": len(state.shards), "quarantined": [p.name for p, _ in state.quarantined],
        "part_list": rows,
        "resubmit": {"indices": redo, "array": array_spec(redo),
                     "command": sbatch_command(redo, parts, script) if redo else None},
        "retry_failed": {"indices": retry, "array": array_spec(retry),
                         "command": (sbatch_command(retry, parts, script, retry_failed=True)
                                     if retry else None)},
    }


def array_spec(indices: list[int]) -> str:
    """[1, 4, 5, 6, 9] -> '1,4-6,9' (sbatch --array syntax)."""
    pieces, run = [], []
    for i in sorted(indices):
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            pieces.append(_run_text(run))
        run = [i]
    if run:
        pieces.append(_run_text(run))
    return ",".join(pieces)


def _run_text(run: list[int]) -> str:
    return str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}"


def sbatch_command(indices: list[int], parts: int, script: str, retry_failed: bool = False) -> str:
    export = f"ALL,PARTS={parts}" + (",RETRY_FAILED=1" if retry_failed else "")
    return f"sbatch --array={array_spec(indices)} --export={export} {script}"


def _lock_holders(directory: Path, parts: int) -> dict:
    holders = {}
    for path in directory.glob(".lock-p*"):
        slot = layout.parse_slot(path.name[len(".lock-"):])
        if slot is None or slot.parts != parts:
            continue
        holder = holder_of(path)
        if holder is not None:
            holders[slot.part] = holder
    return holders


def render(report: dict, show_all: bool | None = None) -> str:
    counts = report["counts"]
    lines = [f"{report['directory']}: {report['parts']} part(s) (--shard I/{report['parts']})",
             "  " + "   ".join(f"{s} {counts[s]}" for s in STATES),
             f"  files: {report['files'] if report['files'] is not None else 'unknown'}   "
             f"committed: {report['committed']}   failed files: {report['failed_files']}   "
             f"shards: {report['shards']}"]
    if report["quarantined"]:
        lines.append(f"  damaged shards (set aside on the next run): "
                     f"{', '.join(report['quarantined'])}")
    if show_all is None:
        show_all = report["parts"] <= 32
    rows = [r for r in report["part_list"] if show_all or r["state"] != "complete"]
    if rows:
        lines.append(f"  {'part':>5}  {'state':<9} {'files':>8} {'committed':>9} {'failed':>7} "
                     f"{'pending':>8} {'shards':>6}  last run")
        for r in rows[:200]:
            dash = lambda v: "-" if v is None else str(v)  # noqa: E731
            note = r["last_run"] or "-"
            if r["holder"]:
                note += f" (held by {r['holder']})"
            if r["error"]:
                note += f": {r['error'].splitlines()[0][:120]}"
            lines.append(f"  {r['part']:>5}  {r['state']:<9} {dash(r['files']):>8} "
                         f"{r['committed']:>9} {r['failed_files']:>7} {dash(r['pending']):>8} "
                         f"{r['shards']:>6}  {note}")
        if len(rows) > 200:
            lines.append(f"  ... {len(rows) - 200} more (--json lists every part)")
    redo, retry = report["resubmit"], report["retry_failed"]
    if redo["command"]:
        what = ", ".join(f"{counts[s]} {s}" for s in RESUBMIT if counts[s])
        lines += [f"resubmit the unfinished parts ({what}):", f"  {redo['command']}"]
    elif counts["running"]:
        lines.append(f"{counts['running']} part(s) running; nothing to resubmit now")
    else:
        lines.append("every part is complete: `fusefeat merge` consolidates them")
    if retry["command"]:
        lines += [f"{len(retry['indices'])} complete part(s) have files that failed "
                  f"(`fusefeat info` says why); to try them again:", f"  {retry['command']}"]
    return "\n".join(lines)
