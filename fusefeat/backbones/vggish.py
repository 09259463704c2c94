"""VGGish (Hershey et al. 2017), torchvggish port: VGGish-Fusion#10#15 = 8192-d.

Network: `torchvggish.torchvggish.VGG(make_layers(), postprocess=False)` (PyPI 0.2). The
official front end (`vggish_input`, numpy, one clip at a time) is recomputed batched in torch;
the STFT runs in float64 because float32 rounding alone moves quiet bands of loud frames by up
to 4e-4 in the log domain. Each clip is cut into 0.96 s examples (the tail is dropped); every
layer is max-pooled along time to the last conv stage's rate (6 frames of 160 ms per example);
the FC layers of `embeddings` are repeated over those frames; frames of all examples are pooled.
"""

from __future__ import annotations

import contextlib

import torch

from fusefeat import frontends
from fusefeat.backbones.base import (BASELINE, Backbone, LayerFrames, LayerInfo, SegmentBatch,
                                     flatten_channels_major)
from fusefeat.backbones.weights import (checkpoint_path, import_module_skipping_package_init,
                                        load_state_dict_strictly, load_torch_checkpoint,
                                        sha256_file, skip_random_init)

# (module path, kind, channels) of the 16 `features` layers then the 6 `embeddings` layers.
_CONV_PLAN = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M"]


def _layer_table(example_frames: int, mel_bins: int) -> tuple[LayerInfo, ...]:
    table, number, stride, channels = [], 1, 1, 1
    time, freq = example_frames, mel_bins
    index = 0
    for item in _CONV_PLAN:
        if item == "M":
            stride, time, freq = stride * 2, time // 2, freq // 2
            table.append(LayerInfo(number, f"features.{index}", "conv", channels, freq, stride,
                                   (channels, time, freq)))
            number, index = number + 1, index + 1
            continue
        channels = item
        for _ in ("conv", "relu"):
            table.append(LayerInfo(number, f"features.{index}", "conv", channels, freq, stride,
                                   (channels, time, freq)))
            number, index = number + 1, index + 1
    for index, width in enumerate((4096, 4096, 4096, 4096, 128, 128)):
        table.append(LayerInfo(number, f"embeddings.{index}", "fc", width, 1, example_frames,
                               (width,)))
        number += 1
    return tuple(table)


class VGGish(Backbone):
    ragged_batches = True  # frame-wise front end, independent examples
    cpu_rows_per_forward = 8  # examples per forward on the CPU (see Backbone)
    baseline_dim = 128
    baseline_description = "VGGish 128-d output (last FC ReLU), mean + max over examples"

    def __init__(self, preset, network: torch.nn.Module, weights_id: str):
        super().__init__(preset)
        self.net = network.eval()
        self.weights_id = weights_id
        fe = preset.frontend
        self.window_length, self.hop_samples = frontends.frame_samples(
            preset.sample_rate, float(fe["window_length_s"]), float(fe["hop_length_s"]))
        self.example_frames = int(fe["example_frames"])
        self.layer_table = self.table(preset)
        self.reference_stride = self.example_frames // 6  # the last conv stage: 6 frames/example
        example_samples = self.example_frames * self.hop_samples
        # Clips shorter than one example are zero-padded to one (the official code yields none).
        self.min_samples = example_samples + self.window_length - self.hop_samples
        self.window_align = example_samples
        self.lookahead_samples = self.window_length - self.hop_samples  # an example's last frame

    @classmethod
    def table(cls, preset, weights=None) -> tuple[LayerInfo, ...]:
        fe = preset.frontend
        return _layer_table(int(fe["example_frames"]), int(fe["mel_bins"]))

    @classmethod
    def build(cls, preset, weights: str | None = None, random_init: bool = False) -> "VGGish":
        tv = import_module_skipping_package_init("torchvggish", "torchvggish")
        with contextlib.nullcontext() if random_init else skip_random_init():
            network = tv.VGG(tv.make_layers(), postprocess=False)
        if random_init:
            return cls(preset, network, "random-init")
        path = checkpoint_path(weights, preset.weights.get("url"), preset.weights.get("filename"),
                               preset.name)
        state = load_torch_checkpoint(path, preset.name)
        load_state_dict_strictly(network, state, path, preset.name)
        return cls(preset, network, "sha256:" + sha256_file(path))

    def featurize(self, batch: SegmentBatch):
        log_mel = frontends.htk_log_mel_float64(batch.wave, self.sample_rate,
                                                self.preset.frontend)  # [B, T, mel]
        # whole examples only, as mel_features.frame; counted on the host: no device sync
        per_row = [frontends.frame_count(n, self.window_length, self.hop_samples)
                    // self.example_frames for n in batch.host_lengths]
        most = max(per_row, default=0)
        b, _, mel = log_mel.shape
        examples = log_mel[:, : most * self.example_frames].reshape(b * most, self.example_frames, mel)
        picks = [row * most + e for row, count in enumerate(per_row) for e in range(count)]
        owners = [row for row, count in enumerate(per_row) for _ in range(count)]
        device = log_mel.device
        picks = torch.tensor(picks, dtype=torch.long).to(device, non_blocking=True)
        owner = torch.tensor(owners, dtype=torch.long).to(device, non_blocking=True)
        return examples.index_select(0, picks).unsqueeze(1), owner  # [N, 1, 96, 64], [N]

    def forward_taps(self, features, taps, baseline, batch):
        x, owner = features
        deepest = self.deepest(taps, 22, baseline)
        conv_layers = list(self.net.features.children())

        def network_rows(x):
            out = {}
            for number, module in enumerate(conv_layers, start=1):
                if number > deepest:
                    break
                x = module(x)
                if number in taps:  # clone: the following ReLU works in place
                    out[number] = flatten_channels_major(x.clone())
            if deepest > len(conv_layers):
                x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # as VGG.forward: [N, T, F, C]
                for number, module in enumerate(self.net.embeddings.children(),
                                                start=len(conv_layers) + 1):
                    if number > deepest:
                        break
                    x = module(x)
                    if number in taps:
                        out[number] = x.clone().unsqueeze(-1)  # [N, D, 1], repeated by fusion
                    if baseline and number == 22:
                        out[BASELINE] = x.clone().unsqueeze(-1)
            return out

        out = {}
        for key, frames in self.rows_in_chunks(x, network_rows).items():
            if key != BASELINE and key <= len(conv_layers):
                stride = self.layer(key).time_stride
            else:  # FC layers: one vector per 0.96 s example
                stride = self.example_frames
            out[key] = LayerFrames.whole(frames, stride, owner)
        return out


BACKBONE = VGGish
