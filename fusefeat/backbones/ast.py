"""Audio Spectrogram Transformer (Gong et al. 2021): AST-Fusion#5#12 = 1536-d.

Network: transformers' `ASTModel` (the base of `ASTForAudioClassification`). Front end: Kaldi
fbank of the mean-removed waveform, batched in torch, normalised as (x - mean) / (2 std) with
the checkpoint's AudioSet statistics. Like the official AST code, the positional embedding is
adapted to each clip's length instead of padding every clip to 1024 frames: the centre of the
12 x 101 patch grid is cut out for shorter clips, and it is bilinearly interpolated for longer
ones. Per selected block: the model's final LayerNorm, then the mean of the CLS and
distillation tokens (one 768-d vector per clip; no time pooling).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from fusefeat.backbones.base import BASELINE, Backbone, LayerFrames, LayerInfo, SegmentBatch, rows_of
from fusefeat.backbones.weights import hf_model_dir
from fusefeat.errors import WeightsError
from fusefeat import frontends


class AST(Backbone):
    pooling = "mean"  # one vector per clip; windows of very long clips are averaged
    baseline_description = "AST output: last block, final LayerNorm, mean of CLS and distillation tokens"

    def __init__(self, preset, network: torch.nn.Module, weights_id: str):
        super().__init__(preset)
        self.net = network.eval()
        self.weights_id = weights_id
        cfg = network.config
        fe = preset.frontend
        self.hop_samples = int(preset.sample_rate * float(fe["frame_shift_ms"]) * 0.001)
        self.frame_samples = int(preset.sample_rate * float(fe["frame_length_ms"]) * 0.001)
        self.layer_table = self.table(preset, config=cfg)
        self.baseline_dim = cfg.hidden_size
        self.reference_stride = 1
        self.patch = cfg.patch_size
        self.time_stride, self.freq_stride = cfg.time_stride, cfg.frequency_stride
        self.grid_freq = (cfg.num_mel_bins - cfg.patch_size) // cfg.frequency_stride + 1
        self.grid_time = (cfg.max_length - cfg.patch_size) // cfg.time_stride + 1
        # At least one patch along time.
        self.min_samples = self.frame_samples + (self.patch - 1) * self.hop_samples
        self.window_align = self.hop_samples
        self._positions: dict[int, torch.Tensor] = {}

    @classmethod
    def table(cls, preset, weights=None, config=None) -> tuple[LayerInfo, ...]:
        blocks, width = 12, 768  # the official checkpoint, without reading anything
        if config is not None:
            blocks, width = config.num_hidden_layers, config.hidden_size
        elif weights is not None and (Path(weights) / "config.json").is_file():
            data = json.loads((Path(weights) / "config.json").read_text())
            blocks, width = data.get("num_hidden_layers", 12), data.get("hidden_size", 768)
        return tuple(LayerInfo(n, f"layers.{n - 1}", "token", width, 1, 0, (width,))
                     for n in range(1, blocks + 1))

    @classmethod
    def build(cls, preset, weights: str | None = None, random_init: bool = False,
              config=None) -> "AST":
        from transformers import ASTModel

        if random_init:
            return cls(preset, ASTModel(config), "random-init")
        directory, identity = hf_model_dir(preset.weights["hf_repo"], preset.weights.get("revision"),
                                           weights, preset.name)
        network = _load_ast(ASTModel, directory, preset.name)
        return cls(preset, network, identity)

    def featurize(self, batch: SegmentBatch) -> torch.Tensor:
        fe = self.preset.frontend
        wave = batch.wave - batch.wave.mean(dim=-1, keepdim=True)  # rows share one length
        fbank = frontends.kaldi_fbank(wave, self.sample_rate, int(fe["mel_bins"]),
                                      float(fe["frame_length_ms"]), float(fe["frame_shift_ms"]),
                                      str(fe.get("window_type", "hanning")))
        return (fbank - float(fe["norm_mean"])) / (2.0 * float(fe["norm_std"]))

    def positions(self, time_patches: int) -> torch.Tensor:
        """The positional embedding for a clip of `time_patches` patch columns (cached)."""
        if time_patches not in self._positions:
            table = self.net.embeddings.position_embeddings  # [1, 2 + F*T, D]
            width = table.shape[-1]
            grid = table[:, 2:].detach().reshape(1, self.grid_freq, self.grid_time, width)
            grid = grid.permute(0, 3, 1, 2)  # [1, D, F, T]
            if time_patches < self.grid_time:  # the centre columns, as the official code
                start = self.grid_time // 2 - time_patches // 2
                grid = grid[..., start:start + time_patches]
            else:
                grid = F.interpolate(grid, size=(self.grid_freq, time_patches), mode="bilinear")
            grid = grid.reshape(1, width, -1).transpose(1, 2)
            self._positions[time_patches] = torch.cat([table[:, :2].detach(), grid], dim=1)
        return self._positions[time_patches]

    def forward_taps(self, features, taps, baseline, batch):
        net = self.net
        last = len(net.layers)
        deepest = self.deepest(taps, last, baseline)
        b, frames, _ = features.shape
        time_patches = (frames - self.patch) // self.time_stride + 1
        x = net.embeddings.patch_embeddings(features)
        cls = net.embeddings.cls_token.expand(b, -1, -1)
        dist = net.embeddings.distillation_token.expand(b, -1, -1)
        x = torch.cat([cls, dist, x], dim=1) + self.positions(time_patches)
        owner = rows_of(b, x.device)
        out = {}
        for number, layer in enumerate(net.layers, start=1):
            if number > deepest:
                break
            x = layer(x)
            if number in taps or (baseline and number == last):
                normed = net.layernorm(x)
                vector = ((normed[:, 0] + normed[:, 1]) / 2).unsqueeze(-1)  # [B, D, 1]
                if number in taps:
                    out[number] = LayerFrames.whole(vector, 1, owner, dense=True)
                if baseline and number == last:
                    out[BASELINE] = LayerFrames.whole(vector, 1, owner, dense=True)
        return out

    def to(self, *args, **kwargs):
        self._positions.clear()
        return super().to(*args, **kwargs)


def _load_ast(model_class, directory, name):
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"cannot read {directory}/config.json: {exc}") from None
    if config.get("model_type") != "audio-spectrogram-transformer":
        raise WeightsError(f"{directory} holds a {config.get('model_type')!r} model, not an AST",
                           hint=f"pass the {name} weights, or use --model hf:{directory} for other encoders")
    try:
        network, info = model_class.from_pretrained(directory, output_loading_info=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types
        raise WeightsError(f"cannot load the AST weights in {directory}: {exc}") from None
    missing = [k for k in info.get("missing_keys", []) if "pooler" not in k]
    if missing:
        raise WeightsError(f"{directory} lacks {len(missing)} AST weights (e.g. {missing[0]})",
                           hint="pass a directory written by save_pretrained() of an AST model")
    return network


BACKBONE = AST
