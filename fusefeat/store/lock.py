"""One writer per slot of an output directory.

An advisory lock (fcntl.flock) on DIR/.lock-<slot>. Where the file system refuses locks (some
NFS and Lustre mounts), fusefeat warns and goes on: shard names are unique per process, so two
writers never corrupt each other's files; at worst they both extract the same inputs, and
readers keep one row per path.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from pathlib import Path

from fusefeat.errors import OutputError
from fusefeat.store.layout import host_and_pid

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


class SlotLock:
    def __init__(self, directory: Path, label: str):
        self.path = directory / f".lock-{label}"
        self.label = label
        self.fd: int | None = None
        self.exclusive = False  # True when the lock really is held

    def acquire(self, patience: float = 2.0) -> "SlotLock":
        """Take the lock; a holder that lets go within `patience` seconds (`fusefeat status`
        probing it, say) is waited for, a real second writer is refused."""
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(f"cannot create {self.path}: {exc.strerror}",
                              hint="choose a writable --out with free space") from None
        if fcntl is None:
            return self
        deadline = time.monotonic() + patience
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.exclusive = True
                break
            except OSError as exc:
                refused = exc
            if (refused.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
                    and time.monotonic() < deadline):
                time.sleep(0.05)
                continue
            break
        if not self.exclusive:
            if refused.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = self._holder()
                os.close(self.fd)
                self.fd = None
                raise OutputError(
                    f"another fusefeat process ({holder}) is writing {self.label} of "
                    f"{self.path.parent}",
                    hint="wait for it to finish, or write to another --out") from None
            print(f"fusefeat: warning: cannot lock {self.path} ({refused.strerror}); going on "
                  "without a lock (see README: shared file systems)", file=sys.stderr)
            return self
        os.ftruncate(self.fd, 0)
        os.write(self.fd, host_and_pid().encode())
        return self

    def _holder(self) -> str:
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def release(self) -> None:
        if self.fd is not None:
            if fcntl is not None and self.exclusive:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def holder_of(path: Path) -> str | None:
    """Who holds the lock file `path` now ("host:pid"), or None when nobody does.

    Probes with a shared lock held for an instant (a writer starting at that moment waits for
    it, see `acquire`). Where locks are refused, says nothing (None)."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                try:
                    return os.read(fd, 256).decode(errors="replace").strip() or "unknown"
                except OSError:
                    return "unknown"
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
