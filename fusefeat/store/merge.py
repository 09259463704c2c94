"""`fusefeat merge DIR -o FILE.h5`: one file with the shards' contract, rows sorted by path.

Copying streams rows in chunks (memory stays flat). `virtual=True` writes an HDF5 virtual
dataset instead: `embeddings` (and layers/baseline) map onto the shards' data without copying,
in runs of consecutive rows; the small per-row columns are copied. A virtual file needs the
shards to stay where they are.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

from fusefeat.errors import OutputError, UsageError
from fusefeat.store import layout
from fusefeat.store.h5 import open_write
from fusefeat.store.atomic import commit_file
from fusefeat.store.reader import _features_from_scan
from fusefeat.store.scan import scan
from fusefeat.store.writer import ERROR_FIELDS, META_FIELDS, STRING, chunk_rows

CHUNK = 4096


def merge(directory: str | Path, output: str | Path, virtual: bool = False) -> dict:
    directory, output = Path(directory), Path(output)
    state = scan(directory, quarantine=False)
    if not state.shards:
        raise UsageError(f"{directory} holds no committed fusefeat shards")
    prints = {info.fingerprint for info in state.shards}
    if len(prints) > 1:
        raise OutputError(f"the shards of {directory} were made with different settings "
                          f"({len(prints)} fingerprints); refusing to merge them",
                          hint="merge each run's directory separately")
    feats = _features_from_scan(state)
    attrs = dict(state.shards[0].attrs)
    temp = output.with_name(layout.TMP_PREFIX + output.name)
    output.parent.mkdir(parents=True, exist_ok=True)
    n, dim = feats.embeddings.shape
    with open_write(temp) as f:
        for key, value in attrs.items():
            f.attrs[key] = value
        f.attrs["format"] = layout.MERGED_FORMAT
        f.attrs["rows"] = n
        f.attrs["errors"] = len(feats.errors)
        f.attrs["merged_from"] = json.dumps([str(i.path.name) for i in state.shards])
        f.create_dataset("path", data=np.array(feats.paths, dtype=object), dtype=STRING)
        shard, row = feats.embeddings._shard, feats.embeddings._row
        for name, dtype in META_FIELDS:
            f.create_dataset(name, data=_column(feats, name, dtype, shard, row))
        matrices = [("embeddings", dim)] + [(f"layers/{k}", v.shape[1]) for k, v in feats.layers.items()]
        if feats.baseline is not None:
            matrices.append(("baseline", feats.baseline.shape[1]))
        for name, width in matrices:
            if virtual:
                _virtual(f, name, width, state, shard, row)
            else:
                view = _view(feats, name)
                ds = f.create_dataset(name, (n, width), dtype=np.float32,
                                      chunks=(min(chunk_rows(width), n), width) if n else None)
                for start in range(0, n, CHUNK):
                    ds[start:start + CHUNK] = view[start:start + CHUNK]
        if feats._frames is not None:
            _copy_frames(f, feats, n)
        for field_name, attr in zip(ERROR_FIELDS, ("path", "stage", "error_type", "message")):
            f.create_dataset(f"errors/{field_name}",
                             data=np.array([getattr(e, attr) for e in feats.errors], dtype=object),
                             dtype=STRING)
        f.attrs["complete"] = 1
    commit_file(temp, output)
    feats.close()
    return {"output": str(output), "rows": n, "dim": dim, "errors": len(feats.errors),
            "shards": len(state.shards), "virtual": virtual,
            "bytes": os.path.getsize(output)}


def _view(feats, name):
    if name == "embeddings":
        return feats.embeddings
    if name == "baseline":
        return feats.baseline
    return feats.layers[int(name.split("/")[1])]


def _column(feats, name, dtype, shard, row):
    out = np.empty(len(feats.paths), dtype=dtype)
    for s in np.unique(shard):
        where = np.nonzero(shard == s)[0]
        out[where] = feats._files.get(int(s))[name][:][row[where]]
    return out


def _virtual(f, name, width, state, shard, row):
    n = len(row)
    layout_ = h5py.VirtualLayout(shape=(n, width), dtype=np.float32)
    start = 0
    while start < n:  # runs of consecutive rows of one shard map as one block
        stop = start + 1
        while stop < n and shard[stop] == shard[start] and row[stop] == row[stop - 1] + 1:
            stop += 1
        info = state.shards[int(shard[start])]
        source = h5py.VirtualSource(os.path.relpath(info.path, Path(f.filename).parent), name,
                                    shape=(info.rows, width))
        layout_[start:stop] = source[int(row[start]):int(row[stop - 1]) + 1]
        start = stop
    f.create_virtual_dataset(name, layout_, fillvalue=np.nan)


def _copy_frames(f, feats, n):
    width = int(feats.meta["frames_dim"])
    data = f.create_dataset("frames/data", (0, width), maxshape=(None, width), dtype=np.float32,
                            chunks=(chunk_rows(width), width))
    offsets = np.zeros(n + 1, dtype=np.int64)
    for i in range(n):
        block = feats.frames(i)
        offsets[i + 1] = offsets[i] + len(block)
        data.resize(offsets[i + 1], axis=0)
        data[offsets[i]:offsets[i + 1]] = block
    f.create_dataset("frames/offsets", data=offsets)
