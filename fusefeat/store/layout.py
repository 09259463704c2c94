"""Names of the files in an output directory (one place, so every module agrees)."""

from __future__ import annotations

import os
import re
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "fusefeat.json"
SHARD_PREFIX = "shard-"
TMP_PREFIX = ".tmp."
QUARANTINE = "quarantine"
PARTS = "parts"
FORMAT = "fusefeat-shard"
MERGED_FORMAT = "fusefeat-merged"
FORMAT_VERSION = 1

_SHARD_RE = re.compile(r"^shard-(?P<slot>p\d+of\d+(?:-d\d+)?)-(?P<run>[0-9a-f]+)-(?P<seq>\d+)\.h5$")
_SLOT_RE = re.compile(r"^p(?P<part>\d+)of(?P<parts>\d+)(?:-d(?P<device>\d+))?$")


@dataclass(frozen=True)
class Slot:
    """Which slice of the input a process writes: part I of N (--shard), device d (--devices)."""

    part: int = 0
    parts: int = 1
    device: int | None = None

    @property
    def label(self) -> str:
        text = f"p{self.part:04d}of{self.parts:04d}"
        return text if self.device is None else f"{text}-d{self.device}"

    @property
    def part_label(self) -> str:
        return f"p{self.part:04d}of{self.parts:04d}"


def new_run_id() -> str:
    """Unique per process, so two writers never pick the same shard name."""
    return secrets.token_hex(4)


def shard_name(slot: Slot, run_id: str, seq: int) -> str:
    return f"{SHARD_PREFIX}{slot.label}-{run_id}-{seq:06d}.h5"


def parse_shard_name(name: str):
    return _SHARD_RE.match(name)


def committed_shards(directory: Path) -> list[Path]:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(directory / n for n in names if _SHARD_RE.match(n))


def temp_files(directory: Path, slot_label: str | None = None) -> list[Path]:
    """Temporary shards (of one slot only, when given: p0000of0001 is not p0000of0001-d0)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        if not name.startswith(TMP_PREFIX + SHARD_PREFIX):
            continue
        match = _SHARD_RE.match(name[len(TMP_PREFIX):])
        if slot_label is None or (match is not None and match.group("slot") == slot_label):
            found.append(directory / name)
    return sorted(found)


def parse_slot(label: str) -> "Slot | None":
    """The Slot a label (p0003of0010, p0003of0010-d1) names, or None."""
    match = _SLOT_RE.match(label)
    if match is None:
        return None
    device = match.group("device")
    return Slot(int(match.group("part")), int(match.group("parts")),
                int(device) if device is not None else None)


def host_and_pid() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"
