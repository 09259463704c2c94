"""Inputs -> the deterministic list of audio files to process.

Directories are walked recursively (symbolic links to directories are followed once; loops
are skipped), keeping files with an audio extension. Each file gets a key: its path relative
to the INPUT directory it was found under, or the path as given for files named directly or
in a list (`--files-from`, `-` for stdin). The list is sorted by key, so the order never depends
on the file system. Keys are what the output stores in `path` and what resume matches on.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import sys
from dataclasses import dataclass, field
from operator import attrgetter
from typing import IO, Iterable, Iterator, NamedTuple, Sequence

from fusefeat.audio import AUDIO_EXTENSIONS
from fusefeat.bulk import gc_paused
from fusefeat.errors import FileFailure, UsageError


class InputFile(NamedTuple):  # a tuple: a million of them are made fast and kept small
    key: str  # stored in the output's `path`; UTF-8 (undecodable bytes escaped as \\xNN)
    source: str  # what to open


@dataclass
class Discovery:
    files: list[InputFile] = field(default_factory=list)
    failures: list[FileFailure] = field(default_factory=list)
    skipped: int = 0  # files passed over while walking: no audio extension


_UTF8_NAMES = sys.getfilesystemencoding().lower().replace("-", "") == "utf8"


def printable_key(path: str) -> str:
    """A UTF-8 string for any file name (non-UTF-8 bytes become \\xNN escapes)."""
    if _UTF8_NAMES:
        try:  # the usual case, fast: a name that is valid UTF-8 is its own key
            path.encode("utf-8")
            return path
        except UnicodeEncodeError:  # undecodable bytes, held as surrogates
            pass
    raw = os.fsencode(path)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="backslashreplace")


def discover(inputs: Sequence[str] = (), files_from: str | None = None,
             stdin: IO[str] | None = None, null_separated: bool = False,
             part: tuple[int, int] | None = None) -> Discovery:
    """The sorted files of `inputs` and `files_from`; with `part=(I, N)` only those of part I
    of N (`select_part`), kept while reading, so that memory follows the part, not the corpus:
    a list of 100 million paths is streamed."""
    with gc_paused():  # a million files: see fusefeat.bulk
        return _discover(inputs, files_from, stdin, null_separated, part)


def _discover(inputs, files_from, stdin, null_separated, part) -> Discovery:
    found = Discovery()
    seen: dict[str, tuple[str, str]] = {}  # key -> (source, the input it came from)
    index, parts = part if part is not None else (0, 1)

    def add(key: str, source: str, from_input: str) -> None:
        if parts > 1 and part_of(key, parts) != index:
            return
        previous = seen.get(key)
        if previous is not None:
            if os.path.realpath(source) != os.path.realpath(previous[0]):
                raise UsageError(
                    f"two inputs give the same path {key!r} ({previous[1]} and {from_input})",
                    hint="pass their common parent directory instead, so that paths stay unique")
            return
        seen[key] = (source, from_input)
        found.files.append(InputFile(key, source))

    for item in inputs:
        if os.path.isdir(item):
            for key, source in _walk(item, found):
                add(key, source, item)
        elif os.path.lexists(item):
            add(printable_key(os.path.normpath(item)), item, item)
        else:
            raise UsageError(f"input not found: {item}",
                             hint="check the path; directories are walked, files are taken as they are")
    if files_from is not None:
        for entry in _read_list(files_from, stdin, null_separated):
            add(printable_key(os.path.normpath(entry)), entry, files_from)
    found.files.sort(key=attrgetter("key"))
    return found


def _walk(root: str, found: Discovery) -> Iterable[tuple[str, str]]:
    visited: set[tuple[int, int]] = set()
    failures = found.failures

    def on_error(exc: OSError) -> None:
        name = printable_key(os.path.relpath(exc.filename, root)) if exc.filename else root
        failures.append(FileFailure(name, "discover", type(exc).__name__,
                                    f"cannot list this directory: {exc.strerror}"))

    for directory, subdirs, files in os.walk(root, onerror=on_error, followlinks=True):
        try:
            st = os.stat(directory)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in visited:  # a symlink loop or a second link to a directory
            subdirs[:] = []
            continue
        visited.add((st.st_dev, st.st_ino))
        subdirs.sort()
        for name in files:
            if os.path.splitext(name)[1].lower() not in AUDIO_EXTENSIONS:
                found.skipped += 1
                continue
            source = os.path.join(directory, name)
            key = printable_key(os.path.relpath(source, root)).replace(os.sep, "/")
            if os.path.islink(source):
                try:
                    os.stat(source)
                except OSError as exc:
                    if exc.errno == errno.ELOOP:
                        failures.append(FileFailure(key, "discover", "SymlinkLoop",
                                                    "symbolic link loop (the link leads back to "
                                                    "itself, never to a file)"))
                    else:
                        failures.append(FileFailure(key, "discover", "BrokenSymlink",
                                                    "broken symbolic link (its target does not "
                                                    "exist)"))
                    continue
            yield key, source


def _read_list(files_from: str, stdin: IO[str] | None, null_separated: bool) -> Iterator[str]:
    """The entries of a list, streamed (blank ones skipped)."""
    if files_from == "-":
        stream = stdin if stdin is not None else sys.stdin
        raw = getattr(stream, "buffer", None)
        if raw is not None:  # bytes decoded like file names (non-UTF-8 names survive as
            # surrogate escapes), not with the locale's strict text codec
            stream = io.TextIOWrapper(raw, encoding=sys.getfilesystemencoding(),
                                      errors="surrogateescape", newline="\n")
        yield from _entries(stream, null_separated)
        return
    try:  # lines end at \n only (a \r before it is dropped): names may hold any other byte
        handle = open(files_from, encoding="utf-8", errors="surrogateescape", newline="\n")
    except OSError as exc:
        raise UsageError(f"cannot read --files-from {files_from}: {exc.strerror}") from None
    with handle:
        yield from _entries(handle, null_separated)


def _entries(stream: IO[str], null_separated: bool) -> Iterator[str]:
    if not null_separated:
        for line in stream:
            entry = line.rstrip("\n").rstrip("\r")
            if entry.strip():
                yield entry
        return
    rest = ""
    while True:
        chunk = stream.read(1 << 20)
        if not chunk:
            break
        pieces = (rest + chunk).split("\0")
        rest = pieces.pop()
        yield from (p for p in pieces if p.strip())
    if rest.strip():
        yield rest


def part_of(key: str, parts: int) -> int:
    """The part (0..parts-1) a file belongs to with --shard I/N: a stable hash of its key,
    independent of Python's hash randomisation, of listing order, and of other files."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % parts


def select_part(files: list[InputFile], index: int, parts: int) -> list[InputFile]:
    if parts <= 1:
        return files
    return [f for f in files if part_of(f.key, parts) == index]
