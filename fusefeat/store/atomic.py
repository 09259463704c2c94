"""Durable, atomic file replacement: write aside, fsync, rename, fsync the directory."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # some file systems do not allow opening directories; rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_file(temp: Path, final: Path, fault=None) -> None:
    """Make `temp` durable and visible as `final` in one step."""
    fsync_file(temp)
    if fault:
        fault("before_rename")
    os.replace(temp, final)
    if fault:
        fault("after_rename")
    fsync_directory(final.parent)


def write_json_atomic(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".tmp.", suffix=".json")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; the manifest is for everyone who reads features
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.write("\n")
        commit_file(Path(temp), path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
