"""The paper's composition, independent of any one backbone.

Per selected layer: frames [N, D, T] at the layer's stride are brought to the backbone's
reference rate (max-pooled along time when finer, repeated when coarser), then pooled over time.
Pooling is kept as running statistics (sum, max, count) so that windows of a long clip, batched
separately, give exactly the pooling over the whole clip. The clip vector of a layer is
mean_t + max_t (or mean_t for one-vector-per-window models); the fused vector concatenates the
layers in order: per-dimension pooling commutes with concatenation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fusefeat.backbones.base import LayerFrames


def align(layer: LayerFrames, reference_stride: int) -> LayerFrames:
    """Bring frames to the reference rate (floor arithmetic, as the official max-pool)."""
    stride = layer.stride
    if reference_stride <= 0 or stride == reference_stride:
        return layer
    if stride < reference_stride:
        k = reference_stride // stride
        frames = F.max_pool1d(layer.frames, kernel_size=k, stride=k)
        return LayerFrames(frames, reference_stride, layer.owner, layer.valid // k, layer.dense)
    r = stride // reference_stride
    frames = layer.frames.repeat_interleave(r, dim=-1)
    return LayerFrames(frames, reference_stride, layer.owner, layer.valid * r, layer.dense)


@dataclass
class PoolStats:
    """Running mean/max statistics, one row per segment (or per clip)."""

    total: torch.Tensor  # [S, D]
    peak: torch.Tensor  # [S, D]
    count: torch.Tensor  # [S]

    def select(self, rows) -> "PoolStats":
        return PoolStats(self.total[rows], self.peak[rows], self.count[rows])

    def merge(self, other: "PoolStats") -> "PoolStats":
        return PoolStats(self.total + other.total, torch.maximum(self.peak, other.peak),
                         self.count + other.count)

    def pooled(self, mode: str) -> torch.Tensor:
        mean = self.total / self.count.clamp(min=1).unsqueeze(-1).to(self.total.dtype)
        return mean + self.peak if mode == "meanmax" else mean


def segment_stats(layer: LayerFrames, segments: int) -> PoolStats:
    """Pool the valid frames of each row and gather rows by the segment that owns them."""
    frames, valid = layer.frames, layer.valid
    n, d, t = frames.shape
    if t == 0:
        row_total = frames.new_zeros((n, d))
        row_peak = frames.new_full((n, d), float("-inf"))
    elif layer.dense:  # no masking: no device synchronisation either
        row_total, row_peak = frames.sum(dim=-1), frames.amax(dim=-1)
    else:
        mask = torch.arange(t, device=frames.device)[None, :] < valid[:, None]  # [N, T]
        row_total = (frames * mask[:, None, :]).sum(dim=-1)
        row_peak = frames.masked_fill(~mask[:, None, :], float("-inf")).amax(dim=-1)
    if layer.dense and n == segments:
        return PoolStats(row_total, row_peak, valid.clone())
    total = torch.zeros(segments, d, device=frames.device, dtype=frames.dtype)
    total.index_add_(0, layer.owner, row_total)
    peak = torch.full((segments, d), float("-inf"), device=frames.device, dtype=frames.dtype)
    peak.scatter_reduce_(0, layer.owner[:, None].expand(-1, d), row_peak, reduce="amax")
    count = torch.zeros(segments, device=frames.device, dtype=valid.dtype)
    count.index_add_(0, layer.owner, valid)
    return PoolStats(total, peak, count)


def fused_frames(layers: list[LayerFrames], segments: int) -> list[torch.Tensor]:
    """The fused per-frame matrix of each segment, [T, sum D] (for --save-frames).

    Layers must already be aligned to one rate and share rows."""
    first = layers[0]
    joined = torch.cat([layer.frames for layer in layers], dim=1)  # [N, D, T]
    valid = torch.stack([layer.valid for layer in layers]).amin(dim=0)
    per_segment: list[list[torch.Tensor]] = [[] for _ in range(segments)]
    for row in range(joined.shape[0]):
        per_segment[int(first.owner[row])].append(joined[row, :, : int(valid[row])].T)
    return [torch.cat(rows) if rows else joined.new_zeros((0, joined.shape[1]))
            for rows in per_segment]
