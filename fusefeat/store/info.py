"""`fusefeat info DIR`: what an output directory holds, for people and for scripts."""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from pathlib import Path

from fusefeat.audio import FLAG_NAMES
from fusefeat.store import layout
from fusefeat.store.h5 import open_read
from fusefeat.store.manifest import read_manifest
from fusefeat.store.scan import scan


def describe(directory: str | Path, check_changed: bool = True) -> dict:
    directory = Path(directory)
    manifest = read_manifest(directory) or {}
    result = scan(directory, quarantine=False, warn=lambda m: None)
    markers = _part_markers(directory)
    committed = result.done()
    failures = result.failures
    by_reason: dict[str, list[str]] = defaultdict(list)
    for key, failure in sorted(failures.items()):
        by_reason[f"{failure.stage}: {failure.error_type}"].append(key)
    flag_counts = _flag_counts(result)
    files_listed = sum(m.get("files", 0) for m in markers.values()) if markers else None
    pending = (max(0, files_listed - len(committed) - len(failures))
               if files_listed is not None else None)
    changed = _changed_files(result, markers) if check_changed else []
    first = result.shards[0].attrs if result.shards else {}
    return {
        "directory": str(directory),
        "model": manifest.get("model") or first.get("model"),
        "layers": manifest.get("layers") or json.loads(first.get("layers", "[]") or "[]"),
        "dim": manifest.get("dim") or first.get("dim"),
        "fingerprint": manifest.get("fingerprint") or first.get("fingerprint"),
        "weights": (manifest.get("fields") or {}).get("weights") or first.get("weights_id"),
        "committed": len(committed),
        "failed": len(failures),
        "pending": pending,
        "files_listed": files_listed,
        "failures_by_reason": {reason: {"count": len(keys), "examples": keys[:5],
                                        "message": failures[keys[0]].message}
                               for reason, keys in sorted(by_reason.items(),
                                                          key=lambda kv: -len(kv[1]))},
        "flags": flag_counts,
        "changed": changed,
        "shards": len(result.shards),
        "quarantined": [str(p.name) for p, _ in result.quarantined],
        "disk_bytes": sum(i.size_bytes for i in result.shards),
        "parts": {label: {k: m.get(k) for k in ("status", "files", "extracted", "failed",
                                                   "failed_total", "pending")}
                  for label, m in sorted(markers.items())},
    }


def _flag_counts(result) -> dict:
    import numpy as np

    counts = Counter()
    rows_of = defaultdict(list)
    for shard, row, _, _ in result.latest.values():
        if row >= 0:
            rows_of[shard].append(row)
    for index, rows in rows_of.items():
        with open_read(result.shards[index].path) as f:
            flags = f["flags"][:][np.array(rows)]
        for bit, name in FLAG_NAMES.items():
            counts[name] += int(np.count_nonzero(flags & bit))
    return {k: v for k, v in counts.items() if v}


def _part_markers(directory: Path) -> dict:
    markers = {}
    parts_dir = directory / layout.PARTS
    if parts_dir.is_dir():
        for path in sorted(parts_dir.glob("*.json")):
            try:
                markers[path.stem] = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
    return markers


def _changed_files(result, markers: dict) -> list[str]:
    """Committed files whose size or mtime differs now (found through the recorded inputs)."""
    roots = []
    for marker in markers.values():
        for item in marker.get("inputs", []):
            if os.path.isdir(item) and item not in roots:
                roots.append(item)
    cwd = [m.get("cwd") for m in markers.values() if m.get("cwd")]
    changed = []
    for key, (_, row, size, mtime) in result.latest.items():
        if row < 0:
            continue
        candidates = [key] if os.path.isabs(key) else [os.path.join(r, key) for r in roots + cwd]
        for path in candidates:
            try:
                st = os.stat(path)
            except OSError:
                continue
            if st.st_size != size or st.st_mtime_ns != mtime:
                changed.append(key)
            break
    return sorted(changed)


def render(report: dict) -> str:
    lines = [f"{report['directory']}: {report['model']} layers {report['layers']} "
             f"-> {report['dim']}-d",
             f"  committed: {report['committed']}   failed: {report['failed']}   pending: "
             f"{report['pending'] if report['pending'] is not None else 'unknown'}",
             f"  shards: {report['shards']} ({report['disk_bytes'] / 1e6:.1f} MB)   "
             f"fingerprint: {report['fingerprint']}",
             f"  weights: {report['weights']}"]
    if report["flags"]:
        lines.append("  flagged rows: " + ", ".join(f"{n} {k}" for k, n in report["flags"].items()))
    if report["failures_by_reason"]:
        lines.append("  failures by reason:")
        for reason, entry in report["failures_by_reason"].items():
            lines.append(f"    {entry['count']:>6}  {reason}: {entry['message']}")
            for example in entry["examples"]:
                lines.append(f"            {example}")
    if report["changed"]:
        lines.append(f"  changed since extraction ({len(report['changed'])}; re-extract with "
                     "--refresh-changed):")
        lines += [f"            {k}" for k in report["changed"][:10]]
    if report["quarantined"]:
        lines.append(f"  damaged shards set aside: {', '.join(report['quarantined'])}")
    return "\n".join(lines)
