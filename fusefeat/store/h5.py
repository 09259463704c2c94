"""Opening HDF5 files on any file system.

Committed shards are immutable and temporary shards are private to their writer, so fusefeat
does not need HDF5's own file locks. Readers still open files with HDF5's defaults (so that
user code opening the same file in the same process with h5py's defaults does not clash), and
fall back to no locking, with one warning, on file systems that refuse locks (some NFS and
Lustre mounts; HDF5_USE_FILE_LOCKING=FALSE silences it). Writers never lock their temp files.
"""

from __future__ import annotations

import sys

import h5py

_warned = False


def open_read(path) -> h5py.File:
    global _warned
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        if "lock" not in str(exc).lower():
            raise
        if not _warned:
            print(f"fusefeat: warning: this file system refuses HDF5 file locks ({path}); "
                  "reading without them (set HDF5_USE_FILE_LOCKING=FALSE to silence this)",
                  file=sys.stderr)
            _warned = True
        return h5py.File(path, "r", locking=False)


def open_write(path) -> h5py.File:
    """A new private file (a shard or merge output under a temporary name)."""
    return h5py.File(path, "w", locking=False)
