"""PANNs CNN14 (Kong et al. 2020), 16 kHz checkpoint: CNN14-Fusion#3#6 = 6144-d.

Network: `panns_inference.models.Cnn14` (imported without the package's __init__, which would
run wget). Its own front end (torchlibrosa STFT + log-mel) runs on the device, batched.
Layers are the six conv blocks, each after its average pool; all are max-pooled along time to
block 6's rate (T/32, 320 ms), as the official code does.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from fusefeat.backbones.base import (BASELINE, Backbone, LayerFrames, LayerInfo, SegmentBatch,
                                     flatten_channels_major, rows_of)
from fusefeat.backbones.weights import (checkpoint_path, import_module_skipping_package_init,
                                        load_state_dict_strictly, load_torch_checkpoint,
                                        sha256_file, skip_random_init)

CHANNELS = (64, 128, 256, 512, 1024, 2048)


def _layer_table(mel_bins: int, hop: int, sample_rate: int) -> tuple[LayerInfo, ...]:
    frames_1s = 1 + sample_rate // hop  # centred STFT
    table = []
    for block, channels in enumerate(CHANNELS, start=1):
        pools = min(block, 5)  # block 6 pools 1x1
        freq = mel_bins // 2 ** pools
        table.append(LayerInfo(block, f"conv_block{block}", "conv", channels, freq, 2 ** pools,
                               (channels, frames_1s // 2 ** pools, freq)))
    return tuple(table)


class Cnn14(Backbone):
    baseline_dim = 2048
    baseline_description = "PANNs embedding: block 6, mean over frequency, max_t + mean_t, fc1, ReLU"

    def __init__(self, preset, network: torch.nn.Module, weights_id: str):
        super().__init__(preset)
        self.net = network.eval()
        self.weights_id = weights_id
        fe = preset.frontend
        self.hop_samples = int(fe["hop_size"])
        self.layer_table = self.table(preset)
        self.reference_stride = 32
        # Block 6 needs >= 32 STFT frames; reflect padding needs > n_fft/2 samples.
        self.min_samples = max(31 * self.hop_samples, int(fe["window_size"]) // 2 + 1)
        self.window_align = 32 * self.hop_samples
        # More than the receptive field of block 6 (about 190 frames each side): windows of a
        # long clip then give the frames a single pass would.
        self.context_samples = 8 * self.window_align

    @classmethod
    def table(cls, preset, weights=None) -> tuple[LayerInfo, ...]:
        fe = preset.frontend
        return _layer_table(int(fe["mel_bins"]), int(fe["hop_size"]), preset.sample_rate)

    @classmethod
    def build(cls, preset, weights: str | None = None, random_init: bool = False) -> "Cnn14":
        models = import_module_skipping_package_init("panns_inference", "models")
        fe = preset.frontend
        with contextlib.nullcontext() if random_init else skip_random_init():
            network = models.Cnn14(
                sample_rate=preset.sample_rate, window_size=int(fe["window_size"]),
                hop_size=int(fe["hop_size"]), mel_bins=int(fe["mel_bins"]), fmin=float(fe["fmin"]),
                fmax=float(fe["fmax"]), classes_num=int(fe["classes_num"]))
        if random_init:
            return cls(preset, network, "random-init")
        path = checkpoint_path(weights, preset.weights.get("url"), preset.weights.get("filename"),
                               preset.name)
        checkpoint = load_torch_checkpoint(path, preset.name)
        state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else checkpoint
        load_state_dict_strictly(network, state, path, preset.name)
        return cls(preset, network, "sha256:" + sha256_file(path))

    def featurize(self, batch: SegmentBatch) -> torch.Tensor:
        x = self.net.spectrogram_extractor(batch.wave)  # [B, 1, T, n_fft/2+1]
        return self.net.logmel_extractor(x)  # [B, 1, T, mel]

    def forward_taps(self, features, taps, baseline, batch):
        net = self.net
        deepest = self.deepest(taps, 6, baseline)
        x = net.bn0(features.transpose(1, 3)).transpose(1, 3)
        owner = rows_of(x.shape[0], x.device)
        out = {}
        for block in range(1, deepest + 1):
            pool = (2, 2) if block < 6 else (1, 1)
            x = getattr(net, f"conv_block{block}")(x, pool_size=pool, pool_type="avg")
            if block in taps:
                stride = self.layer(block).time_stride
                frames = self.crop_window(flatten_channels_major(x), stride, batch)
                out[block] = LayerFrames.whole(frames, stride, owner, dense=True)
        if baseline:
            frames = self.crop_window(x.mean(dim=3), 32, batch)  # [B, 2048, T/32]
            out[BASELINE] = LayerFrames.whole(frames, 32, owner, dense=True)
        return out

    def finish_baseline(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.relu(self.net.fc1(pooled))



BACKBONE = Cnn14
