"""Fault injection for the crash tests: FUSEFEAT_FAULT="POINT:N" kills this process with
SIGKILL the N-th time it reaches POINT (e.g. "before_rename:2"). Points are placed at the
moments where a crash is most dangerous: inside a shard write, between fsync and rename, between
rename and the directory fsync. Unset in normal use (then `reach` costs one comparison)."""

from __future__ import annotations

import os
import signal

_point, _, _count = (os.environ.get("FUSEFEAT_FAULT") or "").partition(":")
_remaining = int(_count or 1) if _point else 0


def reach(point: str) -> None:
    global _remaining
    if not _point or point != _point:
        return
    _remaining -= 1
    if _remaining == 0:
        os.kill(os.getpid(), signal.SIGKILL)
