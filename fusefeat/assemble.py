"""From pooled segment statistics to finished rows, one per input file.

Most clips are one segment and finish with their batch; the windows of a long clip arrive in
any order and in different batches, and are merged (sum, max, count) until the last one is in.
Finished clips of a batch are finalised together on the device: mean + max (or mean), the
backbone's own baseline head, concatenation in layer order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from fusefeat import audio
from fusefeat.backbones.base import BASELINE, Backbone
from fusefeat.runner import BatchResult
from fusefeat.store.writer import Row


@dataclass
class _Partial:
    count: int
    received: int = 0
    stats: dict = field(default_factory=dict)
    frames: dict = field(default_factory=dict)  # piece index -> [T, D]
    silent: bool = True
    flags: int = 0
    info: object = None


class Assembler:
    def __init__(self, backbone: Backbone, taps: tuple[int, ...], baseline: bool,
                 save_layers: bool, save_frames: bool, key_of: Callable[[int], str]):
        self.backbone, self.taps = backbone, taps
        self.baseline, self.save_layers, self.save_frames = baseline, save_layers, save_frames
        self.key_of = key_of
        self.partial: dict[int, _Partial] = {}
        self.dropped: set[int] = set()  # files recorded as failed: late windows are ignored

    def add(self, result: BatchResult) -> list[Row]:
        finished: list[tuple[int, object, int, dict, Optional[torch.Tensor]]] = []
        whole = [i for i, seg in enumerate(result.segments) if seg.piece.count == 1]
        if whole:
            stats = {tap: s.select(whole) for tap, s in result.stats.items()}
            for j, i in enumerate(whole):
                seg = result.segments[i]
                frames = result.frames[i] if result.frames is not None else None
                finished.append((seg.file_index, seg.info, seg.flags, j, frames))
            rows = self._finalise(finished, stats)
        else:
            rows = []
        for i, seg in enumerate(result.segments):
            if seg.piece.count == 1 or seg.file_index in self.dropped:
                continue
            acc = self.partial.setdefault(seg.file_index, _Partial(seg.piece.count, info=seg.info))
            one = {tap: s.select([i]) for tap, s in result.stats.items()}
            acc.stats = one if not acc.stats else {t: acc.stats[t].merge(one[t]) for t in one}
            acc.received += 1
            acc.silent &= bool(seg.flags & audio.FLAG_SILENT)
            acc.flags |= seg.flags & ~audio.FLAG_SILENT
            if result.frames is not None:
                acc.frames[seg.piece.index] = result.frames[i]
            if acc.received == acc.count:
                del self.partial[seg.file_index]
                flags = acc.flags | (audio.FLAG_SILENT if acc.silent else 0)
                frames = (torch.cat([acc.frames[k] for k in sorted(acc.frames)])
                          if acc.frames else None)
                rows += self._finalise([(seg.file_index, acc.info, flags, 0, frames)], acc.stats)
        return rows

    def drop(self, file_index: int) -> None:
        """A window of this file failed: forget what was gathered (the file is recorded failed)."""
        self.partial.pop(file_index, None)
        self.dropped.add(file_index)

    def _finalise(self, finished, stats: dict) -> list[Row]:
        mode = self.backbone.pooling
        with torch.inference_mode():
            vectors = {tap: stats[tap].pooled(mode) for tap in stats}
            fused = torch.cat([vectors[t] for t in self.taps], dim=1).cpu().numpy()
            layers = ({t: vectors[t].cpu().numpy() for t in self.taps}
                      if self.save_layers else {})
            base = (self.backbone.finish_baseline(vectors[BASELINE]).float().cpu().numpy()
                    if self.baseline else None)
        rows = []
        for file_index, info, flags, j, frames in finished:
            rows.append(Row(
                key=self.key_of(file_index), embedding=fused[j],
                duration_s=info.duration_s, sample_rate=info.sample_rate, channels=info.channels,
                file_size=info.size, file_mtime_ns=info.mtime_ns, flags=flags,
                layers={t: v[j] for t, v in layers.items()},
                baseline=None if base is None else base[j],
                frames=None if frames is None else frames.float().cpu().numpy()))
        return rows
