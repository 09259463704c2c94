"""The run manifest (DIR/fusefeat.json) and the checks made before writing to a directory."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from fusefeat.errors import OutputError
from fusefeat.store import layout
from fusefeat.store.h5 import open_read
from fusefeat.store.atomic import write_json_atomic
from fusefeat.store.fingerprint import differences, fingerprint_of


def read_manifest(directory: Path) -> dict | None:
    path = Path(directory) / layout.MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise OutputError(f"{path} is unreadable: {exc}",
                          hint="restore it, or start again with --overwrite") from None


def prepare_output(directory: Path, fields: dict[str, Any], overwrite: bool,
                   extra: dict[str, Any] | None = None) -> dict:
    """Create or check the output directory; returns the manifest."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output directory {directory}: {exc.strerror}",
                          hint="choose a writable --out") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OutputError(f"the output directory {directory} is not writable",
                          hint="choose a writable --out, or fix its permissions")
    if overwrite:
        clear_output(directory)
    fingerprint = fingerprint_of(fields)
    existing = read_manifest(directory)
    if existing is None:
        existing = _manifest_from_shards(directory)
    if existing is not None and existing.get("fingerprint") != fingerprint:
        diff = differences(existing.get("fields", {}), fields)
        raise OutputError(
            f"{directory} holds features made with other settings:\n    " + "\n    ".join(diff),
            hint="use another --out, or --overwrite to delete the existing features")
    manifest = {"format": "fusefeat-run", "format_version": layout.FORMAT_VERSION,
                "fingerprint": fingerprint, "fields": fields,
                "created_unix": time.time(), **(extra or {})}
    if existing is None or read_manifest(directory) is None:
        write_json_atomic(directory / layout.MANIFEST, manifest)
        return manifest
    return existing


def _manifest_from_shards(directory: Path) -> dict | None:
    """A directory whose manifest was lost still has fingerprints in its shards."""

    for shard in layout.committed_shards(directory):
        try:
            with open_read(shard) as f:
                return {"fingerprint": f.attrs["fingerprint"],
                        "fields": json.loads(f.attrs["fingerprint_fields"])}
        except (OSError, KeyError, ValueError):
            continue
    return None


def clear_output(directory: Path) -> None:
    """Delete what fusefeat wrote in `directory` (and nothing else)."""
    for path in layout.committed_shards(directory) + layout.temp_files(directory):
        path.unlink(missing_ok=True)
    for name in (layout.MANIFEST,):
        (directory / name).unlink(missing_ok=True)
    for sub in (layout.PARTS, layout.QUARANTINE):
        shutil.rmtree(directory / sub, ignore_errors=True)
