"""`fusefeat.load(PATH)`: read an output directory (across its shards) or a merged file.

Rows are ordered by path (the key), one row per input file (the newest commit when a file was
extracted twice). Vectors are read lazily: `feats.embeddings` is a RowView that reads only the
rows asked for (`feats.embeddings[1000:2000]`, `np.asarray(feats.embeddings)` for all of them),
so a corpus larger than memory can be read in chunks with `feats.embeddings.chunks(4096)`.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import h5py
import numpy as np

from fusefeat.errors import FileFailure, UsageError
from fusefeat.store.h5 import open_read
from fusefeat.store.scan import Scan, check_shard, scan


class _Files:
    """A small cache of open read-only HDF5 files."""

    def __init__(self, paths: list[Path], keep_open: int = 64):
        self.paths = paths
        self.keep_open = keep_open
        self._open: OrderedDict[int, h5py.File] = OrderedDict()

    def get(self, index: int) -> h5py.File:
        f = self._open.pop(index, None)
        if f is None:
            f = open_read(self.paths[index])
            if len(self._open) >= self.keep_open:
                _, oldest = self._open.popitem(last=False)
                oldest.close()
        self._open[index] = f
        return f

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()


class RowView:
    """Lazy [N, D] float32 rows of one dataset spread over shards."""

    def __init__(self, files: _Files, dataset: str, shard: np.ndarray, row: np.ndarray, dim: int):
        self._files, self._dataset = files, dataset
        self._shard, self._row = shard, row
        self.shape = (len(row), dim)
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, item):
        if isinstance(item, tuple):
            rows, rest = item[0], item[1:]
            return self[rows][(slice(None),) + rest] if not np.isscalar(rows) else self[rows][rest]
        if isinstance(item, (int, np.integer)):
            index = int(item) + (len(self) if item < 0 else 0)
            if not 0 <= index < len(self):
                raise IndexError(item)
            return self._read(np.array([index]))[0]
        indices = np.arange(len(self))[item]
        return self._read(np.asarray(indices, dtype=np.int64))

    def _read(self, indices: np.ndarray) -> np.ndarray:
        out = np.empty((len(indices), self.shape[1]), dtype=np.float32)
        shards, rows = self._shard[indices], self._row[indices]
        for shard in np.unique(shards):
            where = np.nonzero(shards == shard)[0]
            wanted = rows[where]
            order = np.argsort(wanted, kind="stable")
            unique_rows, inverse = np.unique(wanted[order], return_inverse=True)
            block = self._files.get(int(shard))[self._dataset][unique_rows]
            out[where[order]] = block[inverse]
        return out

    def __array__(self, dtype=None, copy=None):
        data = self._read(np.arange(len(self)))
        return data if dtype is None else data.astype(dtype)

    def chunks(self, size: int = 4096) -> Iterator[np.ndarray]:
        for start in range(0, len(self), size):
            yield self[start:start + size]


@dataclass
class Features:
    """What `load` returns. Rows are sorted by `paths`."""

    paths: list[str]
    embeddings: RowView
    duration_s: np.ndarray
    sample_rate: np.ndarray
    flags: np.ndarray
    meta: dict
    layers: dict = field(default_factory=dict)  # layer number -> RowView (with --save-layers)
    baseline: Optional[RowView] = None
    errors: list = field(default_factory=list)  # FileFailure of files that failed
    _files: Optional[_Files] = None
    _frames: Optional[tuple] = None

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def frames(self, index: int) -> np.ndarray:
        """The fused per-frame matrix [T, D] of row `index` (with --save-frames)."""
        if self._frames is None:
            raise KeyError("these features were extracted without --save-frames")
        shard, row = self._frames
        f = self._files.get(int(shard[index]))
        start, stop = f["frames/offsets"][int(row[index]):int(row[index]) + 2]
        return f["frames/data"][start:stop]

    def close(self) -> None:
        if self._files is not None:
            self._files.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load(path: str | Path) -> Features:
    """Read an output directory or a merged .h5 file."""
    path = Path(path)
    if path.is_dir():
        result = scan(path, quarantine=False)
        if not result.shards:
            raise UsageError(f"{path} holds no committed fusefeat shards",
                             hint="run `fusefeat extract ... --out DIR` first, or check the path")
        return _features_from_scan(result)
    if path.is_file():
        return _features_from_file(path)
    raise UsageError(f"{path} does not exist")


def _features_from_scan(result: Scan) -> Features:
    ordered = result.rows_in_order()
    keys = [k for k, _, _ in ordered]
    shard = np.array([s for _, s, _ in ordered], dtype=np.int64)
    row = np.array([r for _, _, r in ordered], dtype=np.int64)
    files = _Files([info.path for info in result.shards])
    first = result.shards[0].attrs
    meta = _meta(first)
    meta["shards"] = [str(info.path.name) for info in result.shards]
    return _assemble(files, keys, shard, row, meta, list(result.failures.values()))


def _features_from_file(path: Path) -> Features:
    try:
        f = open_read(path)
    except OSError as exc:
        raise UsageError(f"cannot open {path} as HDF5: {exc}") from None
    with f:
        problem = check_shard(f)
        if problem:
            raise UsageError(f"{path} is not a usable fusefeat file: {problem}")
        keys = list(f["path"].asstr()[:])
        meta = _meta(dict(f.attrs))
        failures = [FileFailure(*v) for v in zip(*[f[f"errors/{n}"].asstr()[:]
                                                  for n in ("path", "stage", "type", "message")])]
    order = np.argsort(np.array(keys, dtype=object), kind="stable")
    keys = [keys[i] for i in order]
    files = _Files([path])
    return _assemble(files, keys, np.zeros(len(keys), np.int64), order.astype(np.int64), meta,
                     failures)


def _assemble(files: _Files, keys, shard, row, meta, failures) -> Features:
    def column(name: str, dtype) -> np.ndarray:
        out = np.empty(len(keys), dtype=dtype)
        for s in np.unique(shard):
            where = np.nonzero(shard == s)[0]
            out[where] = files.get(int(s))[name][:][row[where]]
        return out

    dim = int(meta["dim"])
    layer_dims = {int(k): int(v) for k, v in json.loads(meta.get("layer_dims", "{}")).items()}
    layers = {n: RowView(files, f"layers/{n}", shard, row, d) for n, d in layer_dims.items()}
    baseline_dim = int(meta.get("baseline_dim", 0) or 0)
    return Features(
        paths=keys, embeddings=RowView(files, "embeddings", shard, row, dim),
        duration_s=column("duration_s", np.float64), sample_rate=column("sample_rate", np.int32),
        flags=column("flags", np.uint8), meta=meta, layers=layers,
        baseline=RowView(files, "baseline", shard, row, baseline_dim) if baseline_dim else None,
        errors=failures, _files=files,
        _frames=(shard, row) if int(meta.get("frames_dim", 0) or 0) else None)


def _meta(attrs: dict) -> dict:
    meta = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in attrs.items()}
    for key in ("layers", "layer_modules", "config"):
        if isinstance(meta.get(key), str):
            try:
                meta[key] = json.loads(meta[key])
            except ValueError:
                pass
    return meta
