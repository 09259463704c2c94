"""Shard writing: rows stream into a temporary HDF5 file, which is committed atomically.

A shard is written under a temporary name in the output directory, in chunks as rows arrive
(memory stays flat), and committed when it holds `shard_size` records or `commit_seconds` have
passed: attributes last (`complete = 1`), flush, fsync, rename into place, fsync the directory.
A committed shard is never opened for writing again. Readers ignore temporary files, so a kill
at any instant leaves only committed shards, each complete.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import h5py
import numpy as np

from fusefeat.errors import FileFailure, OutputError
from fusefeat.store import faults, layout
from fusefeat.store.h5 import open_write
from fusefeat.store.atomic import commit_file

STRING = h5py.string_dtype("utf-8")
META_FIELDS = (  # per-row metadata datasets: name, dtype
    ("duration_s", np.float64), ("sample_rate", np.int32), ("channels", np.int16),
    ("file_size", np.int64), ("file_mtime_ns", np.int64), ("flags", np.uint8),
)
ERROR_FIELDS = ("path", "stage", "type", "message")


@dataclass
class Row:
    key: str
    embedding: np.ndarray
    duration_s: float
    sample_rate: int
    channels: int
    file_size: int
    file_mtime_ns: int
    flags: int = 0
    layers: dict = field(default_factory=dict)  # layer number -> its own pooled vector
    baseline: Optional[np.ndarray] = None
    frames: Optional[np.ndarray] = None  # [T, D] fused frames before pooling


@dataclass(frozen=True)
class Schema:
    dim: int
    layer_dims: dict  # layer number -> dim (stored with --save-layers)
    baseline_dim: Optional[int]
    frames_dim: Optional[int]


def chunk_rows(dim: int) -> int:
    """Rows per HDF5 chunk: about 1 MiB of float32, at most 256 rows."""
    return int(max(1, min(256, (1 << 20) // (4 * max(1, dim)))))


class ShardWriter:
    def __init__(self, directory: Path, slot: layout.Slot, run_id: str, attrs: dict,
                 schema: Schema, shard_size: int = 1000, commit_seconds: float = 600.0):
        self.directory = Path(directory)
        self.slot, self.run_id, self.attrs, self.schema = slot, run_id, attrs, schema
        self.shard_size = max(1, shard_size)
        self.commit_seconds = commit_seconds
        self.seq = 0
        self.committed: list[Path] = []
        self._file: Optional[h5py.File] = None
        self._temp: Optional[Path] = None
        self._opened_at = 0.0
        self._rows: list[Row] = []  # buffered, not yet in the file
        self._errors: list[FileFailure] = []
        self._written_rows = 0
        self._written_errors = 0
        self._frames_written = 0

    # ---- public ---------------------------------------------------------------------------
    def add_row(self, row: Row) -> None:
        self._ensure_open()
        self._rows.append(row)
        if len(self._rows) >= chunk_rows(self.schema.dim):
            self._flush_rows()
        self._maybe_commit()

    def add_error(self, failure: FileFailure) -> None:
        self._ensure_open()
        self._errors.append(failure)
        self._maybe_commit()

    def commit(self) -> Optional[Path]:
        """Commit what is open (if anything). Returns the committed shard's path."""
        if self._file is None:
            return None
        self._flush_rows()
        self._flush_errors()
        f = self._file
        f.attrs["rows"] = self._written_rows
        f.attrs["errors"] = self._written_errors
        f.attrs["committed_ns"] = time.time_ns()
        faults.reach("before_complete")
        f.attrs["complete"] = 1
        f.flush()
        f.close()
        self._file = None
        final = self.directory / layout.shard_name(self.slot, self.run_id, self.seq)
        commit_file(self._temp, final, fault=faults.reach)
        self.committed.append(final)
        self._temp = None
        return final

    def abandon(self) -> None:
        """Drop the open shard without committing (its inputs stay pending)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._temp is not None and self._temp.exists():
            self._temp.unlink()
        self._temp = None

    # ---- internals ------------------------------------------------------------------------
    def _maybe_commit(self) -> None:
        records = self._written_rows + len(self._rows) + self._written_errors + len(self._errors)
        if records >= self.shard_size or time.monotonic() - self._opened_at >= self.commit_seconds:
            self.commit()

    def _ensure_open(self) -> None:
        if self._file is not None:
            return
        self.seq += 1
        name = layout.shard_name(self.slot, self.run_id, self.seq)
        self._temp = self.directory / (layout.TMP_PREFIX + name)
        try:
            f = open_write(self._temp)
        except OSError as exc:
            raise OutputError(f"cannot create {self._temp}: {exc}",
                              hint="check that --out is writable and has free space") from None
        for key, value in self.attrs.items():
            f.attrs[key] = str(value) if isinstance(value, str) else value  # plain str: vlen UTF-8
        f.attrs["format"] = layout.FORMAT
        f.attrs["format_version"] = layout.FORMAT_VERSION
        f.attrs["complete"] = 0
        s = self.schema
        rows = chunk_rows(s.dim)
        f.create_dataset("embeddings", (0, s.dim), maxshape=(None, s.dim), dtype=np.float32,
                         chunks=(rows, s.dim))
        f.create_dataset("path", (0,), maxshape=(None,), dtype=STRING, chunks=(1024,))
        for name_, dtype in META_FIELDS:
            f.create_dataset(name_, (0,), maxshape=(None,), dtype=dtype, chunks=(1024,))
        for number, dim in s.layer_dims.items():
            f.create_dataset(f"layers/{number}", (0, dim), maxshape=(None, dim), dtype=np.float32,
                             chunks=(chunk_rows(dim), dim))
        if s.baseline_dim:
            f.create_dataset("baseline", (0, s.baseline_dim), maxshape=(None, s.baseline_dim),
                             dtype=np.float32, chunks=(chunk_rows(s.baseline_dim), s.baseline_dim))
        if s.frames_dim:
            f.create_dataset("frames/data", (0, s.frames_dim), maxshape=(None, s.frames_dim),
                             dtype=np.float32, chunks=(chunk_rows(s.frames_dim), s.frames_dim))
            f.create_dataset("frames/offsets", (1,), maxshape=(None,), dtype=np.int64,
                             chunks=(1024,), data=np.zeros(1, np.int64))
        for name_ in ERROR_FIELDS:
            f.create_dataset(f"errors/{name_}", (0,), maxshape=(None,), dtype=STRING, chunks=(256,))
        self._file = f
        self._opened_at = time.monotonic()
        self._written_rows = self._written_errors = self._frames_written = 0

    def _flush_rows(self) -> None:
        if not self._rows or self._file is None:
            return
        f, rows, start = self._file, self._rows, self._written_rows
        stop = start + len(rows)

        def append(name: str, values) -> None:
            dataset = f[name]
            dataset.resize(stop, axis=0)
            dataset[start:stop] = values

        append("embeddings", np.stack([r.embedding for r in rows]).astype(np.float32, copy=False))
        append("path", [r.key for r in rows])
        for name_, dtype in META_FIELDS:
            append(name_, np.array([getattr(r, name_) for r in rows], dtype=dtype))
        for number in self.schema.layer_dims:
            append(f"layers/{number}", np.stack([r.layers[number] for r in rows]))
        if self.schema.baseline_dim:
            append("baseline", np.stack([r.baseline for r in rows]))
        if self.schema.frames_dim:
            data, offsets = f["frames/data"], f["frames/offsets"]
            lengths = [len(r.frames) for r in rows]
            total = self._frames_written + sum(lengths)
            data.resize(total, axis=0)
            data[self._frames_written:total] = np.concatenate([r.frames for r in rows])
            offsets.resize(stop + 1, axis=0)
            offsets[start + 1:stop + 1] = self._frames_written + np.cumsum(lengths)
            self._frames_written = total
        self._written_rows = stop
        self._rows = []
        faults.reach("rows_written")

    def _flush_errors(self) -> None:
        if not self._errors or self._file is None:
            return
        start = self._written_errors
        stop = start + len(self._errors)
        for name_, attr in zip(ERROR_FIELDS, ("path", "stage", "error_type", "message")):
            dataset = self._file[f"errors/{name_}"]
            dataset.resize(stop, axis=0)
            dataset[start:stop] = [getattr(e, attr) for e in self._errors]
        self._written_errors = stop
        self._errors = []


class BackgroundWriter:
    """Runs a ShardWriter in a thread so writing never stalls the model.

    The queue is bounded (memory stays flat when the disk is slow). An error in the thread is
    raised in the caller at its next call."""

    _STOP = object()

    def __init__(self, writer: ShardWriter, max_queue: int = 256):
        self.writer = writer
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="fusefeat-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is self._STOP:
                return
            if self._error is not None:
                continue  # drain; the caller will see the error
            try:
                kind, payload = item
                if kind == "row":
                    self.writer.add_row(payload)
                elif kind == "error":
                    self.writer.add_error(payload)
                elif kind == "commit":
                    self.writer.commit()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                self._error = exc

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def put_row(self, row: Row) -> None:
        self._raise_if_failed()
        self._queue.put(("row", row))

    def put_error(self, failure: FileFailure) -> None:
        self._raise_if_failed()
        self._queue.put(("error", failure))

    def close(self, commit: bool = True) -> list[Path]:
        """Finish writing; commit the open shard (or abandon it) and return committed shards."""
        if commit:
            self._queue.put(("commit", None))
        self._queue.put(self._STOP)
        self._thread.join()
        if not commit or self._error is not None:
            self.writer.abandon()
        self._raise_if_failed()
        return self.writer.committed
