"""Where each clip is cut: one segment for most clips, windows for long ones.

All positions are in samples at the backbone's rate ("target"). A clip shorter than two windows
is one segment. A longer clip is cut into windows of `window` samples (the last one takes the
rest, so it holds between one and two windows); each window is read with the backbone's context
around it (computed, then dropped) and its look-ahead (samples its last frames need). Windows
start on multiples of the resampling ratio, so resampling a window with a margin gives exactly
the samples resampling the whole file gives, and on multiples of the backbone's alignment (whole
VGGish examples, whole CNN14 block-6 frames), so pooling over windows equals pooling over the clip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Geometry:
    """What a backbone asks of segments (target samples)."""

    sample_rate: int
    window: int  # window length, a multiple of align
    align: int
    context: int  # dropped context on both sides of a window
    lookahead: int  # extra samples after a window that its own last frames need
    min_samples: int  # shorter clips are zero-padded to this


@dataclass(frozen=True)
class Piece:
    """One segment of one clip, in target samples, plus the source range to read."""

    index: int
    count: int
    start: int  # first target sample computed (window start minus context)
    length: int  # target samples computed (before padding to the minimum)
    drop_left: int  # context samples at the start whose frames are dropped
    keep: Optional[int]  # window samples whose frames are kept; None = to the end
    read_start: int  # source samples to read: [read_start, read_stop)
    read_stop: int
    trim_left: int  # target samples to drop from the resampled read (the resampling margin)
    padded_length: int  # the length the model sees (>= min_samples)


def ratio(source_rate: int, target_rate: int) -> tuple[int, int]:
    g = math.gcd(source_rate, target_rate)
    return source_rate // g, target_rate // g


def resample_margin(source_rate: int, target_rate: int) -> int:
    """Source samples of margin, a multiple of the reduced source rate, wider than torchaudio's
    sinc kernel (lowpass_filter_width 6, rolloff 0.99) plus its own padding."""
    if source_rate == target_rate:
        return 0
    orig, new = ratio(source_rate, target_rate)
    width = math.ceil(6 * orig / (min(orig, new) * 0.99))
    return orig * (math.ceil((width + orig) / orig) + 1)


def resampled_length(frames: int, source_rate: int, target_rate: int) -> int:
    orig, new = ratio(source_rate, target_rate)
    return -(-new * frames // orig)


def plan(source_frames: int, source_rate: int, geometry: Geometry,
         clip_samples: Optional[int] = None) -> list[Piece]:
    """Cut one clip. `clip_samples` crops or zero-pads it to a fixed length (--clip-seconds)."""
    total = clip_samples if clip_samples is not None else resampled_length(
        source_frames, source_rate, geometry.sample_rate)
    orig, new = ratio(source_rate, geometry.sample_rate)
    window = geometry.window
    exact_windows = window > 0 and window % new == 0 and geometry.align % new == 0
    count = max(1, total // window) if exact_windows else 1
    margin = resample_margin(source_rate, geometry.sample_rate)
    pieces = []
    for k in range(count):
        a = k * window
        b = total if k == count - 1 else (k + 1) * window
        start = a if k == 0 else a - geometry.context
        stop = total if k == count - 1 else min(total, b + geometry.context + geometry.lookahead)
        if count == 1:
            start, stop = 0, total
        # source range: target start is a multiple of `new` (window alignment), so this is exact
        src_start = max(0, start * orig // new - margin)
        src_start -= src_start % orig
        src_stop = min(source_frames, -(-stop * orig // new) + margin)
        trim_left = start - src_start * new // orig
        length = stop - start
        pieces.append(Piece(
            index=k, count=count, start=start, length=length,
            drop_left=a - start, keep=None if k == count - 1 else b - a,
            read_start=src_start, read_stop=max(src_start, src_stop), trim_left=trim_left,
            padded_length=max(length, geometry.min_samples)))
    return pieces
