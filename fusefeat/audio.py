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


def _native(path: str):
    """The path as libsndfile must get it: soundfile encodes str paths strictly as UTF-8, which
    fails for names that are not UTF-8 (they arrive as surrogate escapes); bytes always work."""
    return os.fsencode(path) if os.name == "posix" else path


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
        info = sf.info(_native(path))
    except sf.LibsndfileError as exc:
        kind, message = _unreadable(path, exc.error_string or str(exc))
        raise AudioError(message, kind=kind) from None
    except (RuntimeError, TypeError, ValueError) as exc:  # soundfile wraps some errors oddly
        kind, message = _unreadable(path, str(exc))
        raise AudioError(message, kind=kind) from None
    if info.samplerate <= 0:
        raise AudioError(f"invalid sample rate {info.samplerate} Hz in the header",
                         kind="BadHeader")
    if info.frames <= 0:
        raise AudioError("the file holds no audio samples", kind="EmptyAudio")
    return AudioInfo(frames=int(info.frames), sample_rate=int(info.samplerate),
                     channels=int(info.channels), size=int(st.st_size),
                     mtime_ns=int(st.st_mtime_ns), truncated=_wav_is_truncated(path))


def read_mono(path: str, start: int, stop: int) -> np.ndarray:
    """Samples [start, stop) averaged over channels, float32. Raises AudioError.

    Many-channel files are read in blocks, so reading never holds more than the mono result
    plus one block (an 8-channel 192 kHz window would otherwise need 8 times the memory)."""
    try:
        with sf.SoundFile(_native(path)) as handle:
            if start:
                handle.seek(start)
            mono = _read_mono_blocks(handle, stop - start)
    except sf.LibsndfileError as exc:
        raise _read_failure(path, exc.error_string or str(exc)) from None
    except (RuntimeError, ValueError, OSError) as exc:
        raise _read_failure(path, str(exc)) from None
    if not np.isfinite(mono).all():
        nan = int(np.isnan(mono).sum())
        inf = int(np.isinf(mono).sum())
        raise AudioError(f"contains non-finite samples ({nan} NaN, {inf} infinite, from sample "
                         f"{start + int(np.argmin(np.isfinite(mono)))}); fusefeat does not guess "
                         "replacement values: repair the file", kind="NonFiniteSamples")
    return np.ascontiguousarray(mono)


READ_BLOCK_SAMPLES = 1 << 20  # samples (all channels) per read of a many-channel file


PCM16_SCALE = np.float32(1.0 / 32768.0)  # libsndfile's int16 -> float scale (a power of two)


def _read_mono_blocks(handle: sf.SoundFile, frames: int) -> np.ndarray:
    if handle.channels == 1 and handle.subtype == "PCM_16":
        # libsndfile's float conversion costs ~2 ms per 10 s at 44.1 kHz; reading int16 and
        # scaling by the same power of two gives the same floats, bit for bit, in a fraction
        samples = handle.read(frames, dtype="int16", always_2d=True)[:, 0]
        return np.multiply(samples, PCM16_SCALE, dtype=np.float32)
    if handle.channels == 1:
        return handle.read(frames, dtype="float32", always_2d=True)[:, 0]
    mono = np.empty(max(0, frames), dtype=np.float32)
    block = max(1, READ_BLOCK_SAMPLES // handle.channels)
    done = 0
    while done < frames:
        data = handle.read(min(block, frames - done), dtype="float32", always_2d=True)
        if not len(data):
            break  # the file ended early (truncated): keep what is there
        mono[done:done + len(data)] = data.mean(axis=1, dtype=np.float32)
        done += len(data)
    return mono[:done]


def _read_failure(path: str, reason: str) -> AudioError:
    if not os.path.lexists(path):
        return AudioError("file not found: it was deleted or moved while fusefeat was reading it",
                          kind="FileNotFound")
    return AudioError(f"decoding failed: {reason}", kind="DecodeError")


def content_flags(mono: np.ndarray) -> int:
    flags = 0
    if not mono.any():
        flags |= FLAG_SILENT
    elif np.count_nonzero(np.abs(mono) >= 0.999) >= max(1, mono.size // 1000):
        flags |= FLAG_CLIPPED
    return flags


# WAV format tags libsndfile decodes (WAVE_FORMAT_EXTENSIBLE is resolved to its sub-format).
_WAV_TAGS_DECODED = {0x0001, 0x0002, 0x0003, 0x0006, 0x0007, 0x0011, 0x0031, 0x0040}
_WAV_TAG_NAMES = {0x0050: "MPEG-1 Layer 1/2", 0x0055: "MPEG Layer 3 (MP3)", 0x00FF: "AAC",
                  0x0160: "WMA v1", 0x0161: "WMA", 0x0162: "WMA Pro", 0x0163: "WMA Lossless",
                  0x1610: "HE-AAC", 0x2000: "AC-3", 0x2001: "DTS", 0x0022: "TrueSpeech",
                  0x0092: "Dolby AC-3 SPDIF", 0xF1AC: "FLAC", 0x674F: "Vorbis", 0x704F: "Opus"}


def _unreadable(path: str, reason: str) -> tuple[str, str]:
    """(kind, message) for a file libsndfile cannot open: what it looks like, in words."""
    reason = reason.strip() or "unknown reason"
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096)
            size = os.fstat(handle.fileno()).st_size
    except OSError:
        head, size = b"", 0
    guess = _guess_format(head)
    if guess:
        return "NotAudio", f"not audio: the content looks like {guess} (libsndfile: {reason})"
    if head[:4] in (b"RIFF", b"RIFX") and head[8:12] == b"WAVE":
        tag = _wav_format_tag(head)
        if tag is not None and tag not in _WAV_TAGS_DECODED:
            name = _WAV_TAG_NAMES.get(tag, "unknown codec")
            return "UnsupportedCodec", (
                f"unsupported codec: this WAV file holds audio in format 0x{tag:04X} ({name}), "
                f"which libsndfile cannot decode; convert it to PCM or FLAC first, e.g. "
                f"ffmpeg -i IN -c:a pcm_s16le OUT.wav (libsndfile: {reason})")
        declared = int.from_bytes(head[4:8], "little") + 8 if len(head) >= 8 else 0
        if len(head) < 12 or declared > size:
            return "TruncatedFile", (
                f"truncated file: it holds {size} bytes, its RIFF header declares {declared}; "
                f"the header is incomplete (libsndfile: {reason})")
        return "DamagedHeader", f"damaged WAV header (libsndfile: {reason})"
    formats = ", ".join(sorted(sf.available_formats()))
    return "UnreadableAudio", (f"not a readable audio file (libsndfile: {reason}); readable "
                               f"formats: {formats}")


def _wav_format_tag(head: bytes) -> int | None:
    """The codec tag of a RIFF/WAVE file's fmt chunk, from its first bytes (None if absent)."""
    offset = 12
    while offset + 8 <= len(head):
        chunk_id = head[offset:offset + 4]
        chunk_size = int.from_bytes(head[offset + 4:offset + 8], "little")
        if chunk_id == b"fmt ":
            body = head[offset + 8:offset + 8 + chunk_size]
            if len(body) < 2:
                return None
            tag = int.from_bytes(body[:2], "little")
            if tag == 0xFFFE and len(body) >= 26:  # WAVE_FORMAT_EXTENSIBLE: the sub-format GUID
                tag = int.from_bytes(body[24:26], "little")
            return tag
        offset += 8 + chunk_size + (chunk_size & 1)
    return None


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
