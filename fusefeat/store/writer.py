"""Shard writing: rows stream into a temporary HDF5 file, which is committed atomically.

A shard is written under a temporary name in the output directory, in chunks as rows arrive
(memory stays flat), and committed when it holds `shard_size` records or `commit_seconds` have
passed: attributes last (`complete = 1`), flush, fsync, rename into place, fsync the directory.
A committed shard is never opened for writing again. Readers ignore temporary files, so a kill
at any instant leaves only committed shards, each complete.
"""

from __future__ import annotations

import errno
import os
import queue
import re

try:
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import h5py
import numpy as np

from fusefeat.errors import FileFailure, WriteError
from fusefeat.store import faults, layout
from fusefeat.store.h5 import open_write
from fusefeat.store.atomic import commit_file

STRING = h5py.string_dtype("utf-8")
META_FIELDS = (  # per-row metadata datasets: name, dtype
    ("duration_s", np.float64), ("sample_rate", np.int32), ("channels", np.int16),
    ("file_size", np.int64), ("file_mtime_ns", np.int64), ("flags", np.uint8),
)
ERROR_FIELDS = ("path", "stage", "type", "message")


class _NoRoom(OSError):
    """A write refused before it started: the disk or the file size limit cannot take it."""


def write_error(directory: Path, exc: BaseException) -> WriteError:
    """A failed write (OSError, or h5py's RuntimeError that carries the errno in its text) as
    a message for a person: which directory, what the system said, what to do."""
    number = getattr(exc, "errno", None)
    if not isinstance(number, int):
        match = re.search(r"errno = (\d+)", str(exc))
        number = int(match.group(1)) if match else None
    reason = os.strerror(number) if number else (str(exc).splitlines()[0] if str(exc) else
                                                   type(exc).__name__)
    resume = "the shards committed so far are kept: run the same command again to resume"
    if number in (errno.ENOSPC, errno.EDQUOT):
        hint = f"free disk space (or raise your quota) on the file system of {directory}; {resume}"
    elif number == errno.EFBIG:
        hint = (f"a file size limit (ulimit -f) stops fusefeat writing a shard: raise it, or "
                f"lower --shard-size; {resume}")
    else:
        hint = f"check that {directory} is writable and the disk is healthy; {resume}"
    return WriteError(f"cannot write to the output directory {directory}: {reason}", hint=hint)


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
        self._committed_records = 0

    # ---- public ---------------------------------------------------------------------------
    def add_row(self, row: Row) -> None:
        self._guarded(self._add_row, row)

    def add_error(self, failure: FileFailure) -> None:
        self._guarded(self._add_error, failure)

    def commit(self) -> Optional[Path]:
        """Commit what is open (if anything). Returns the committed shard's path."""
        return self._guarded(self._commit)

    def _guarded(self, action, *args):
        """Run a write; a failure becomes a WriteError. The original exception is dropped on
        purpose: its traceback holds h5py objects of the broken file, which must not outlive
        abandon() (freed at interpreter exit, after HDF5 itself, they crash the process)."""
        try:
            return action(*args)
        except (OSError, RuntimeError) as exc:
            error = write_error(self.directory, exc)
            # refused by _ensure_room: HDF5 never saw a failure. Otherwise it did, and its
            # leftovers may crash the interpreter at exit (the CLI then leaves at once).
            error.hdf5_failed = not isinstance(exc, _NoRoom)
            self._detach()  # before `exc` (and the h5py objects its frames hold) is freed
        raise error

    def _detach(self) -> None:
        """Point the broken temporary file's descriptor at /dev/null.

        After a failed write, HDF5 keeps dirty chunks and metadata and retries writing them at
        every later close or reference drop, each failure reported on stderr, and the leftovers
        crash the interpreter at exit. The file is thrown away anyway: with its descriptor on
        /dev/null those writes succeed and HDF5 closes it cleanly; abandon() removes the file."""
        if self._file is None:
            return
        try:
            fd = self._file.id.get_vfd_handle()
            null = os.open(os.devnull, os.O_RDWR)
        except Exception:  # noqa: BLE001 - not a POSIX file driver: nothing to redirect
            return
        try:
            os.dup2(null, int(fd))
        except OSError:
            pass
        finally:
            os.close(null)

    def _add_row(self, row: Row) -> None:
        self._ensure_open()
        self._rows.append(row)
        if len(self._rows) >= chunk_rows(self.schema.dim):
            self._flush_rows()
        self._maybe_commit()

    def _add_error(self, failure: FileFailure) -> None:
        self._ensure_open()
        self._errors.append(failure)
        self._maybe_commit()

    @property
    def committed_records(self) -> int:
        return self._committed_records

    # ---- room on the disk -------------------------------------------------------------------
    # HDF5 does not recover from a write that fails inside it (dirty chunks and metadata it can
    # neither write nor drop; reference counts it cannot decrement; a crash at interpreter exit).
    # So every write is preceded by a check that the file system and the file size limit can take
    # it: a full disk or `ulimit -f` is then an ordinary OSError, raised before HDF5 starts.
    METADATA_MARGIN = 256 << 10  # object headers, B-trees, heaps written with a flush

    def _ensure_room(self, new_bytes: int) -> None:
        if self._temp is None:
            return
        margin = self.METADATA_MARGIN
        if self._written_rows or self._rows:  # a partly filled chunk per float dataset
            s = self.schema
            dims = [s.dim, *s.layer_dims.values(), s.baseline_dim or 0, s.frames_dim or 0]
            margin += sum(chunk_rows(d) * d * 4 for d in dims if d)
        needed = new_bytes + margin
        try:
            stats = os.statvfs(self.directory)
        except OSError:
            stats = None
        # f_blocks 0: a file system that reports no sizes (some FUSE mounts): nothing to check
        if stats is not None and stats.f_blocks and stats.f_bavail * stats.f_frsize < needed:
            raise _NoRoom(errno.ENOSPC, os.strerror(errno.ENOSPC))
        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0] if resource else -1
        if soft not in (-1, getattr(resource, "RLIM_INFINITY", -1)):
            try:
                size = os.path.getsize(self._temp)
            except OSError:
                size = 0
            if size + needed > soft:
                raise _NoRoom(errno.EFBIG, os.strerror(errno.EFBIG))

    def _row_bytes(self, rows: list[Row]) -> int:
        s = self.schema
        per_row = 4 * (s.dim + sum(s.layer_dims.values()) + (s.baseline_dim or 0)) + 64
        frames = sum(r.frames.size * 4 for r in rows if r.frames is not None)
        return len(rows) * per_row + frames + sum(len(r.key.encode()) + 16 for r in rows)

    def _commit(self) -> Optional[Path]:
        if self._file is None:
            return None
        self._flush_rows()
        self._flush_errors()
        self._ensure_room(0)  # the cached chunks and the metadata written by flush and close
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
        self._committed_records += self._written_rows + self._written_errors
        self._temp = None
        return final

    def abandon(self) -> None:
        """Drop the open shard without committing (its inputs stay pending). Never raises: it
        runs after a failure (a full disk), whose message matters more."""
        if self._file is not None:
            self._detach()
            try:
                self._file.close()
            except Exception:  # noqa: BLE001 - the file was broken by the first failure
                pass
            self._file = None
        if self._temp is not None:
            try:
                self._temp.unlink(missing_ok=True)
            except OSError:
                pass
        self._temp = None
        self._rows, self._errors = [], []

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
            self._temp.unlink(missing_ok=True)
            raise write_error(self.directory, exc) from None
        self._file = f  # from here on, abandon() closes and removes it
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
        self._ensure_room(self._row_bytes(self._rows))
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
        self._ensure_room(sum(len(e.path.encode()) + len(e.message.encode()) + 64
                              for e in self._errors))
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

    def close(self, commit: bool = True, raise_errors: bool = True) -> list[Path]:
        """Finish writing; commit the open shard (or abandon it) and return committed shards."""
        if commit:
            self._queue.put(("commit", None))
        self._queue.put(self._STOP)
        self._thread.join()
        if not commit or self._error is not None:
            self.writer.abandon()
        if raise_errors:
            self._raise_if_failed()
        return self.writer.committed
