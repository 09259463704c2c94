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
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    prefix = TMP_PREFIX + SHARD_PREFIX + (slot_label + "-" if slot_label else "")
    return sorted(directory / n for n in names if n.startswith(prefix))


def host_and_pid() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"
