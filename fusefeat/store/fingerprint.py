"""The run fingerprint: everything that changes the numbers in the output.

Stored in the manifest and in every shard. A second run into the same directory must have the
same fingerprint, otherwise its rows would not be comparable with the committed ones. Batch
size, worker count and device are not part of it (they do not change the vectors beyond
float rounding), so a run may be resumed on another machine.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def fingerprint_of(fields: dict[str, Any]) -> str:
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    lines = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            lines.append(f"{key}: {_short(old.get(key))} (in the directory) vs {_short(new.get(key))} (now)")
    return lines


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."
