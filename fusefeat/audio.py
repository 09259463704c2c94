"""Decoding: soundfile reads, channels are averaged to mono, nothing else happens here.

Runs inside decode workers, so it imports neither torch nor h5py. Every expected problem
becomes an AudioError with a message a person understands; the run records it and goes on.
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass

import numpy as np
import soundfile as sf

from fusefeat.errors import AudioError

# Extensions picked up when walking a directory (explicit files are always tried).
AUDIO_EXTENSIONS = frozenset({
    ".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc",
    ".au", ".snd", ".caf", ".w64", ".rf64",
})

# Row flags (a bit field stored per row; `fusefeat info` counts them).
FLAG_PADDED = 1  # shorter than the model's minimum: zero-padded to it
FLAG_SILENT = 2  # every sample is zero
FLAG_TRUNCATED = 4  # the file holds fewer samples than its header declares; read what is there
FLAG_CLIPPED = 8  # at least 0.1 % of samples at full scale
FLAG_NAMES = {FLAG_PADDED: "padded", FLAG_SILENT: "silent", FLAG_TRUNCATED: "truncated",
              FLAG_CLIPPED: "clipped"}


@dataclass(frozen=True)
class AudioInfo:
    frames: int
    sample_rate: int
    channels: int
    size: int
    mtime_ns: int
    truncated: bool = False

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate else 0.0


def probe(path: str) -> AudioInfo:
    """Open the file once: existence, size, format, length. Raises AudioError."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise AudioError("broken symbolic link (its target does not exist)",
                             kind="BrokenSymlink") from None
        raise AudioError("file not found (deleted or moved after it was listed?)",
                         kind="FileNotFound") from None
    except PermissionError:
        raise AudioError("permission denied: cannot read this file", kind="PermissionDenied") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise AudioError("symbolic link loop", kind="SymlinkLoop") from None
        raise AudioError(f"cannot access the file: {exc.strerror}", kind="OSError") from None
    if os.path.isdir(path):
        raise AudioError("is a directory, not an audio file", kind="IsADirectory")
    if st.st_size == 0:
        raise AudioError("empty file (0 bytes)", kind="EmptyFile")
    if not os.access(path, os.R_OK):
        raise AudioError("permission denied: cannot read this file", kind="PermissionDenied")
    try:
        info = sf.info(path)
    except sf.LibsndfileError as exc:
        raise AudioError(_unreadable_message(path, exc), kind="UnreadableAudio") from None
    except (RuntimeError, TypeError, ValueError) as exc:  # soundfile wraps some errors oddly
        raise AudioError(f"not a readable audio file: {exc}", kind="UnreadableAudio") from None
    if info.samplerate <= 0:
        raise AudioError(f"invalid sample rate {info.samplerate} Hz in the header",
                         kind="BadHeader")
    if info.frames <= 0:
        raise AudioError("the file holds no audio samples", kind="EmptyAudio")
    return AudioInfo(frames=int(info.frames), sample_rate=int(info.samplerate),
                     channels=int(info.channels), size=int(st.st_size),
                     mtime_ns=int(st.st_mtime_ns), truncated=_wav_is_truncated(path))


def read_mono(path: str, start: int, stop: int) -> np.ndarray:
    """Samples [start, stop) averaged over channels, float32. Raises AudioError."""
    try:
        with sf.SoundFile(path) as handle:
            if start:
                handle.seek(start)
            data = handle.read(stop - start, dtype="float32", always_2d=True)
    except sf.LibsndfileError as exc:
        raise AudioError(f"decoding failed: {exc.error_string}", kind="DecodeError") from None
    except (RuntimeError, ValueError, OSError) as exc:
        raise AudioError(f"decoding failed: {exc}", kind="DecodeError") from None
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if not np.isfinite(mono).all():
        bad = int((~np.isfinite(mono)).sum())
        raise AudioError(f"contains {bad} non-finite samples (NaN or Inf); fusefeat does not "
                         "guess replacement values: repair the file", kind="NonFiniteSamples")
    return np.ascontiguousarray(mono)


def content_flags(mono: np.ndarray) -> int:
    flags = 0
    if not mono.any():
        flags |= FLAG_SILENT
    elif np.count_nonzero(np.abs(mono) >= 0.999) >= max(1, mono.size // 1000):
        flags |= FLAG_CLIPPED
    return flags


def _unreadable_message(path: str, exc: sf.LibsndfileError) -> str:
    reason = exc.error_string or str(exc)
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError:
        head = b""
    guess = _guess_format(head)
    if guess:
        return f"not audio: the content looks like {guess} ({reason})"
    return f"not a readable audio file ({reason}); supported: {', '.join(sorted(sf.available_formats()))}"


def _guess_format(head: bytes) -> str | None:
    signatures = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"%PDF": "a PDF",
                  b"PK\x03\x04": "a ZIP archive", b"GIF8": "a GIF image", b"\x1f\x8b": "gzip data"}
    for magic, name in signatures.items():
        if head.startswith(magic):
            return name
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "text"
    return None


def _wav_is_truncated(path: str) -> bool:
    """True when a RIFF/WAVE file's data chunk declares more bytes than the file holds
    (libsndfile then silently returns the shorter audio)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return False
            size = os.fstat(handle.fileno()).st_size
            offset = 12
            while offset + 8 <= size:
                handle.seek(offset)
                chunk_id, chunk_size = struct.unpack("<4sI", handle.read(8))
                if chunk_id == b"data":
                    return chunk_size != 0xFFFFFFFF and offset + 8 + chunk_size > size
                offset += 8 + chunk_size + (chunk_size & 1)
    except OSError:
        return False
    return False
