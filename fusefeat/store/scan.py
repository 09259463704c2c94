"""Reading what an output directory has committed: the resume index.

Only committed shards count (temporary files are ignored). A shard that cannot be opened or
does not pass its checks (complete flag, row counts, shapes) is moved to quarantine/ and its
inputs become pending again; it is never read as data. When a path appears in several shards
(a file re-extracted with --refresh-changed or --retry-failed), the newest commit wins.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import h5py
import numpy as np

from fusefeat.errors import FileFailure
from fusefeat.store import layout
from fusefeat.store.h5 import open_read


@dataclass
class ShardInfo:
    path: Path
    rows: int
    errors: int
    committed_ns: int
    fingerprint: str
    slot: str
    size_bytes: int
    attrs: dict = field(default_factory=dict)


@dataclass
class Scan:
    shards: list[ShardInfo] = field(default_factory=list)
    # key -> (shard index, row or -1 for an error record, file size, mtime_ns)
    latest: dict = field(default_factory=dict)
    failures: dict = field(default_factory=dict)  # key -> FileFailure (latest is an error)
    quarantined: list = field(default_factory=list)  # (path, reason)

    def done(self) -> set[str]:
        return {k for k, v in self.latest.items() if v[1] >= 0}

    def rows_in_order(self) -> list[tuple[str, int, int]]:
        """(key, shard index, row) of every extracted file, sorted by key."""
        return [(k, v[0], v[1]) for k, v in sorted(self.latest.items()) if v[1] >= 0]


def check_shard(f: h5py.File) -> Optional[str]:
    """Why a shard must not be trusted, or None."""
    attrs = f.attrs
    if attrs.get("format") not in (layout.FORMAT, layout.MERGED_FORMAT):
        return "not a fusefeat shard"
    if int(attrs.get("complete", 0)) != 1:
        return "never completed"
    rows, errors = int(attrs.get("rows", -1)), int(attrs.get("errors", -1))
    try:
        if f["embeddings"].shape[0] != rows or f["path"].shape[0] != rows:
            return f"holds {f['embeddings'].shape[0]} rows, its header says {rows}"
        if f["embeddings"].shape[1] != int(attrs.get("dim", -1)):
            return "embedding width differs from its header"
        if f["errors/path"].shape[0] != errors:
            return "error count differs from its header"
    except KeyError as exc:
        return f"lacks dataset {exc}"
    return None


def scan(directory: Path, quarantine: bool = True, warn=None) -> Scan:
    directory = Path(directory)
    warn = warn or (lambda message: print(f"fusefeat: warning: {message}", file=sys.stderr))
    result = Scan()
    newest: dict[str, tuple[int, str]] = {}  # key -> (committed_ns, shard name) of its record
    for path in layout.committed_shards(directory):
        try:
            with open_read(path) as f:
                problem = check_shard(f)
                if problem is None:
                    info, keys, sizes, mtimes, failures = _read_index(f, path)
        except (OSError, KeyError, ValueError, RuntimeError) as exc:
            problem = f"unreadable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        if problem is not None:
            _set_aside(directory, path, problem, quarantine, warn, result)
            continue
        index = len(result.shards)
        result.shards.append(info)
        stamp = (info.committed_ns, path.name)
        for row, key in enumerate(keys):
            if newest.get(key, (-1, ""))[0:2] < stamp:
                newest[key] = stamp
                result.latest[key] = (index, row, int(sizes[row]), int(mtimes[row]))
                result.failures.pop(key, None)
        for failure in failures:
            if newest.get(failure.path, (-1, ""))[0:2] < stamp:
                newest[failure.path] = stamp
                result.latest[failure.path] = (index, -1, -1, -1)
                result.failures[failure.path] = failure
    return result


def _read_index(f: h5py.File, path: Path):
    attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
    match = layout.parse_shard_name(path.name)
    info = ShardInfo(path=path, rows=int(attrs["rows"]), errors=int(attrs["errors"]),
                     committed_ns=int(attrs.get("committed_ns", 0)),
                     fingerprint=str(attrs.get("fingerprint", "")),
                     slot=match.group("slot") if match else "",
                     size_bytes=os.path.getsize(path), attrs=attrs)
    keys = f["path"].asstr()[:] if info.rows else []
    sizes = f["file_size"][:] if info.rows else []
    mtimes = f["file_mtime_ns"][:] if info.rows else []
    failures = []
    if info.errors:
        columns = [f[f"errors/{n}"].asstr()[:] for n in ("path", "stage", "type", "message")]
        failures = [FileFailure(*values) for values in zip(*columns)]
    return info, list(keys), sizes, mtimes, failures


def _set_aside(directory: Path, path: Path, problem: str, quarantine: bool, warn, result: Scan):
    if quarantine:
        target_dir = directory / layout.QUARANTINE
        target_dir.mkdir(exist_ok=True)
        try:
            os.replace(path, target_dir / path.name)
            warn(f"{path.name} is damaged ({problem}); moved to {layout.QUARANTINE}/, "
                 "its files will be extracted again")
        except OSError as exc:
            warn(f"{path.name} is damaged ({problem}) and could not be moved aside: {exc}")
    else:
        warn(f"{path.name} is damaged ({problem}); ignored")
    result.quarantined.append((path, problem))


def fields_of(info: ShardInfo) -> dict:
    return json.loads(info.attrs.get("fingerprint_fields", "{}"))
