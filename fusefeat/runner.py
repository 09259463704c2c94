"""One batch on the device: resample, pad, front end, network taps, alignment, pooling.

Returns, per tap, pooled statistics for each segment of the batch (and the fused frames with
--save-frames). A failing batch is retried in halves (on CUDA out-of-memory the batch size is
lowered for the rest of the run), so one bad clip fails alone.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from fusefeat import frontends
from fusefeat.backbones.base import Backbone, SegmentBatch
from fusefeat.errors import FileFailure
from fusefeat.fusion import align, fused_frames, segment_stats
from fusefeat.loader import Segment

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class BatchResult:
    segments: list[Segment]
    stats: dict  # tap -> PoolStats with one row per segment
    frames: Optional[list] = None  # per segment [T, D] tensors (with --save-frames)


class StageError(Exception):
    def __init__(self, stage: str, exc: BaseException):
        super().__init__(str(exc))
        self.stage, self.exc = stage, exc


class Runner:
    def __init__(self, backbone: Backbone, taps: tuple[int, ...], baseline: bool,
                 save_frames: bool, device: torch.device, precision: str = "fp32"):
        self.backbone, self.taps, self.baseline = backbone, taps, baseline
        self.save_frames, self.device = save_frames, device
        self.dtype = PRECISIONS[precision]
        self.pin = device.type == "cuda"
        self.max_batch: Optional[int] = None  # lowered after an out-of-memory error

    # ---- the batch ------------------------------------------------------------------------
    def prepare(self, segments: list[Segment]) -> SegmentBatch:
        """Waveforms at the backbone's rate on the device, one row per segment."""
        target = self.backbone.sample_rate
        rows: list[Optional[torch.Tensor]] = [None] * len(segments)
        by_rate: dict[int, list[int]] = {}
        for i, seg in enumerate(segments):
            by_rate.setdefault(seg.sample_rate, []).append(i)
        for rate, members in by_rate.items():
            width = max(1, max(segments[i].wave.shape[0] for i in members))
            host = torch.empty(len(members), width, dtype=torch.float32, pin_memory=self.pin)
            for j, i in enumerate(members):  # (empty, not zeros: rows are written once)
                wave = segments[i].wave
                host[j, : wave.shape[0]] = torch.from_numpy(wave)
                host[j, wave.shape[0]:] = 0.0
            # zero padding after a row is what torchaudio pads with anyway: the row's samples
            # are those of resampling the clip alone (up to float rounding)
            resampled = frontends.resample(host.to(self.device, non_blocking=True), rate, target)
            for j, i in enumerate(members):
                piece = segments[i].piece
                # the clip's own resampled length: what lies beyond is the filter's ringing
                # into the padding of longer rows, which resampling the clip alone never yields
                end = frontends.resampled_length(segments[i].wave.shape[0], rate, target)
                rows[i] = resampled[j, piece.trim_left: min(piece.trim_left + piece.length, end)]
        lengths = [seg.piece.padded_length for seg in segments]
        wave = torch.empty(len(segments), max(lengths), dtype=torch.float32, device=self.device)
        for i, row in enumerate(rows):
            wave[i, : row.shape[0]] = row
            wave[i, row.shape[0]:] = 0.0  # the clip ended (zero-padded), or a shorter row
        piece = segments[0].piece
        device_lengths = torch.tensor(lengths, dtype=torch.long, pin_memory=self.pin)
        return SegmentBatch(wave=wave, lengths=device_lengths.to(self.device, non_blocking=True),
                            drop_left=piece.drop_left, keep=piece.keep, host_lengths=lengths)

    def forward(self, batch: SegmentBatch) -> dict:
        """Front end and network taps of a prepared batch."""
        with torch.inference_mode():
            return self._taps(batch, self.backbone.featurize(batch))

    def _taps(self, batch: SegmentBatch, features) -> dict:
        autocast = (torch.autocast(self.device.type, dtype=self.dtype)
                    if self.dtype is not None else contextlib.nullcontext())
        with torch.inference_mode(), autocast:
            return self.backbone.forward_taps(features, self.taps, self.baseline, batch)

    def featurized(self, segments: list[Segment]) -> Optional[tuple]:
        """(batch, front-end features) of segments, or None when that fails: run_safely then
        does it again inline and handles the failure. On a GPU it runs in a background
        thread, so the front end of the next batch overlaps the network of this one (inference
        mode is thread-local, hence set here); on a CPU the pipeline calls it inline."""
        try:
            batch = self.prepare(segments)
            with torch.inference_mode():
                return batch, self.backbone.featurize(batch)
        except Exception:  # noqa: BLE001 - the inline retry reports it, per file
            return None

    def run(self, segments: list[Segment], ready: Optional[tuple] = None) -> BatchResult:
        if ready is None:
            try:
                batch = self.prepare(segments)
            except (RuntimeError, ValueError) as exc:
                raise StageError("resample", exc) from exc
        else:
            batch = ready[0]
        try:
            outputs = self.forward(batch) if ready is None else self._taps(batch, ready[1])
            with torch.inference_mode():
                aligned = {tap: align(out, self.backbone.reference_stride)
                           for tap, out in outputs.items()}
                stats = {}
                for tap, layer in aligned.items():
                    layer.frames = layer.frames.float()
                    stats[tap] = segment_stats(layer, len(segments))
                frames = None
                if self.save_frames:
                    frames = fused_frames([aligned[t] for t in self.taps], len(segments))
        except torch.cuda.OutOfMemoryError:
            raise
        except (RuntimeError, ValueError, IndexError) as exc:
            raise StageError("model", exc) from exc
        return BatchResult(segments, stats, frames)

    # ---- failure handling -----------------------------------------------------------------------
    def run_safely(self, segments: list[Segment], keys,
                   ready: Optional[tuple] = None) -> tuple[list[BatchResult], list]:
        """Results for the segments that worked, and (file index, FileFailure) for the others.
        `ready`: the segments' featurized() output, when computed ahead."""
        try:
            return [self.run(segments, ready)], []
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            if len(segments) == 1:
                return [], [(segments[0].file_index, FileFailure(
                    keys(segments[0].file_index), "model", "OutOfMemory",
                    "out of GPU memory even alone; lower --window-seconds or use --device cpu"))]
            self.max_batch = max(1, len(segments) // 2)
            print(f"fusefeat: out of GPU memory with {len(segments)} clips per batch; "
                  f"going on with {self.max_batch}", file=sys.stderr)
            return self._halves(segments, keys)
        except StageError as exc:
            if len(segments) == 1:
                inner = exc.exc
                return [], [(segments[0].file_index, FileFailure(
                    keys(segments[0].file_index), exc.stage, type(inner).__name__,
                    f"{exc.stage} failed: {str(inner).splitlines()[0] if str(inner) else inner!r}"))]
            return self._halves(segments, keys)

    def _halves(self, segments, keys):
        middle = len(segments) // 2
        results, failures = [], []
        for part in (segments[:middle], segments[middle:]):
            r, f = self.run_safely(part, keys)
            results += r
            failures += f
        return results, failures
