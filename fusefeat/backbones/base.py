"""The protocol every backbone implements; fusion and the pipeline know nothing else.

A backbone is a torch module that knows its sample rate, its table of layers (paper numbering,
module path, channels, frequency bins, time stride), how to turn a batch of waveforms into its
input (`featurize`, on the device), and how to run only as deep as the deepest requested layer
and hand back each requested layer as frames (`forward_taps`). Fusion does the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from fusefeat.config import Preset


@dataclass(frozen=True)
class LayerInfo:
    """One tappable layer (like timm's feature_info entries)."""

    number: int  # the paper's 1-based number (0 = embedding output where a model has one)
    module: str  # module path inside the backbone's network, e.g. "features.9"
    kind: str  # "conv" [C, T, F] maps, "fc" vectors per example, "token" per-clip vectors, "frames"
    channels: int
    freq_bins: int  # 1 where the layer has no frequency axis
    time_stride: int  # front-end frames per layer frame (0: one vector per clip or window)
    shape_1s: tuple[int, ...] = ()  # output shape for one 1 s clip (batch dim omitted)

    @property
    def frame_dim(self) -> int:
        return self.channels * self.freq_bins


@dataclass
class SegmentBatch:
    """Waveforms at the backbone's rate, ready for `featurize`.

    All rows share `drop_left`/`keep` (they are part of the batching key): a window of a long
    clip may carry context samples around it whose frames are computed and then dropped.
    """

    wave: torch.Tensor  # [B, L] float32, zero-padded after each row's length
    lengths: torch.Tensor  # [B] int64, valid samples per row (on the device)
    drop_left: int = 0  # context samples before the window (frames there are dropped)
    keep: Optional[int] = None  # samples of the window itself; None = to the end of the row
    host_lengths: Optional[list] = None  # the same lengths on the host (no device sync needed)

    def __post_init__(self):
        if self.host_lengths is None:
            self.host_lengths = [int(n) for n in self.lengths.tolist()]


@dataclass
class LayerFrames:
    """One tap's output for a batch: frames [N, D, T] at `stride` front-end frames per frame.

    Row n belongs to segment `owner[n]` of the batch (VGGish: rows are 0.96 s examples);
    `valid[n]` frames of row n are real (the rest is padding and must not be pooled).
    """

    frames: torch.Tensor
    stride: int
    owner: torch.Tensor
    valid: torch.Tensor
    dense: bool = False  # row n is segment n and every frame is real (no masking, no gather)

    @classmethod
    def whole(cls, frames: torch.Tensor, stride: int, owner: torch.Tensor,
              dense: bool = False) -> "LayerFrames":
        """Every frame of every row is real; `dense` when rows are the batch's segments."""
        return cls(frames, stride, owner, torch.full_like(owner, frames.shape[-1]), dense)


BASELINE = "baseline"


class Backbone(torch.nn.Module):
    """Base class. Subclasses set the class attributes and implement the three methods."""

    #: "meanmax": clip vector = mean over frames + max over frames (the paper's CNN recipe);
    #: "mean": one vector per window, windows averaged (AST).
    pooling = "meanmax"
    #: True when rows of different lengths can share a batch with exactly the numbers each would
    #: get alone (frame-wise front ends on independent examples: VGGish, YAMNet).
    ragged_batches = False

    def __init__(self, preset: Preset):
        super().__init__()
        self.preset = preset
        self.sample_rate = preset.sample_rate

    # ---- description -------------------------------------------------------------------
    layer_table: tuple[LayerInfo, ...] = ()
    reference_stride: int = 1  # the frame rate all layers are aligned to (front-end frames)
    hop_samples: int = 160  # samples per front-end frame
    min_samples: int = 1  # shorter clips are zero-padded to this (and flagged)
    window_align: int = 160  # window boundaries of long clips fall on multiples of this
    context_samples: int = 0  # computed-then-dropped samples around each window
    lookahead_samples: int = 0  # samples after a window that its last frames still read
    baseline_dim: int = 0
    baseline_description: str = ""
    #: On the CPU, run the network on at most this many input rows at a time (None: all). Small
    #: networks on many 0.96 s patches are bound by memory traffic there: maps of a few patches
    #: stay in cache. Measured on 2 cores (YAMNet 320 patches: 1.81 s at once, 0.57 s in 16s;
    #: VGGish 160 examples: 2.10 s, 1.55 s in 8s; CNN14 gains nothing). GPUs want whole batches.
    cpu_rows_per_forward: Optional[int] = None

    @property
    def layer_numbers(self) -> tuple[int, ...]:
        return tuple(info.number for info in self.layer_table)

    @classmethod
    def default_layers(cls, preset: Preset, table: tuple[LayerInfo, ...]) -> tuple[int, ...]:
        """The layers fused when --layers is not given: the preset's, else the last one."""
        return tuple(preset.default_layers) or (table[-1].number,)

    def layer(self, number: int) -> LayerInfo:
        for info in self.layer_table:
            if info.number == number:
                return info
        raise KeyError(number)

    def batch_key(self, length: int, drop_left: int, keep: Optional[int]) -> Any:
        """Rows with equal keys may share a batch."""
        if self.ragged_batches:
            return (drop_left, keep)
        return (length, drop_left, keep)

    # ---- computation --------------------------------------------------------------------
    def featurize(self, batch: SegmentBatch) -> Any:
        """Waveforms -> the network's input (on the device). Must be batch-invariant."""
        raise NotImplementedError

    def forward_taps(self, features: Any, taps: tuple[int, ...], baseline: bool,
                     batch: SegmentBatch) -> dict:
        """Run as deep as the deepest tap; return {layer number or BASELINE: LayerFrames}."""
        raise NotImplementedError

    def finish_baseline(self, pooled: torch.Tensor) -> torch.Tensor:
        """Turn the pooled baseline frames into the model's own clip embedding."""
        return pooled

    # ---- helpers for subclasses --------------------------------------------------------------
    def deepest(self, taps: tuple[int, ...], baseline_layer: Optional[int], baseline: bool) -> int:
        wanted = list(taps) + ([baseline_layer] if baseline and baseline_layer else [])
        return max(wanted)

    def rows_in_chunks(self, x: torch.Tensor, network_rows) -> dict:
        """`network_rows(x)` -> {key: tensor with x's rows first}, run on slices of x's rows
        where cpu_rows_per_forward says so, joined again (each row's numbers are its own)."""
        chunk = self.cpu_rows_per_forward
        if x.device.type != "cpu" or chunk is None or x.shape[0] <= chunk:
            return network_rows(x)
        parts = [network_rows(piece) for piece in x.split(chunk)]
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}

    def crop_window(self, frames: torch.Tensor, stride: int, batch: SegmentBatch) -> torch.Tensor:
        """Drop the frames computed for context around a window (frames [N, D, T])."""
        if batch.drop_left == 0 and batch.keep is None:
            return frames
        per_frame = self.hop_samples * stride
        start = batch.drop_left // per_frame
        stop = frames.shape[-1] if batch.keep is None else start + batch.keep // per_frame
        return frames[..., start:stop]


def flatten_channels_major(x: torch.Tensor) -> torch.Tensor:
    """[N, C, T, F] -> [N, C*F, T], channel-major and frequency-minor (the paper's order)."""
    n, c, t, f = x.shape
    return x.transpose(2, 3).reshape(n, c * f, t)


def rows_of(batch_size: int, device) -> torch.Tensor:
    return torch.arange(batch_size, device=device)
