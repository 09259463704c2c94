"""YAMNet (Google; AudioSet, 521 classes; MobileNetV1), torch-vggish-yamnet port.

Network: `torch_vggish_yamnet.yamnet.model.YAMNet` (PyPI 0.2.1): `layer1` (3x3 conv) and
`layer2`..`layer14` (depthwise-separable convs), TF 'SAME' padding, then a global average pool
(the 1024-d embedding) and `classifier`. The package's own `WaveformToInput` only approximates
TF YAMNet; the front end here is TF YAMNet's (`features.py`), batched on the device:

* the waveform is zero-padded to at least 15600 samples (one 0.96 s patch plus the rest of its
  last STFT window), then to a whole number of 0.48 s patch hops, per row;
* 25 ms periodic-Hann frames, 10 ms hop, no centre padding, |rfft 512|, 64 HTK mel bands
  125-7500 Hz with triangles in mel space (the VGGish recipe, shared in `frontends`),
  log(mel + 0.001); computed in float64 (see `frontends.htk_log_mel_float64`);
* patches of 96 frames every 48 frames, each fed to the network alone ([N, 1, 96, 64]).

Layers are the 14 blocks (1-based, as `layer1`..`layer14`). Per patch, every selected block is
max-pooled along time to block 14's rate (3 frames of 0.32 s per patch) and flattened channel x
frequency, channel-major; frames of all patches are joined and pooled (mean_t + max_t). The
reference rate is fixed (block 14's), as in the paper's code for VGGish and CNN14, so a block's
vector does not depend on which other blocks are selected. Baseline: YAMNet's 1024-d embedding
(global average pool of block 14 per patch), mean + max over patches.
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

# (stride, output channels) of layer1..layer14, as torch_vggish_yamnet's YAMNet.net_configs.
BLOCKS = ((2, 32), (1, 64), (2, 128), (1, 128), (2, 256), (1, 256), (2, 512), (1, 512),
          (1, 512), (1, 512), (1, 512), (1, 512), (2, 1024), (1, 1024))
EMBEDDING_DIM = 1024


def _layer_table(patch_frames: int, mel_bins: int) -> tuple[LayerInfo, ...]:
    table, stride, time, freq = [], 1, patch_frames, mel_bins
    for number, (step, channels) in enumerate(BLOCKS, start=1):
        if step == 2:  # TF 'SAME': ceil(size / 2)
            stride, time, freq = stride * 2, -(-time // 2), -(-freq // 2)
        table.append(LayerInfo(number, f"layer{number}", "conv", channels, freq, stride,
                               (channels, time, freq)))
    return tuple(table)


def official_padded_length(num_samples, min_samples: int, hop: int):
    """TF YAMNet's `pad_waveform`: at least `min_samples`, then whole patch hops beyond them."""
    if isinstance(num_samples, torch.Tensor):
        beyond = torch.clamp(num_samples - min_samples, min=0)
        return min_samples + torch.div(beyond + hop - 1, hop, rounding_mode="floor") * hop
    beyond = max(0, num_samples - min_samples)
    return min_samples + -(-beyond // hop) * hop


class YAMNet(Backbone):
    ragged_batches = True  # frame-wise front end, independent patches, padding applied per row
    cpu_rows_per_forward = 16  # patches per forward on the CPU (see Backbone)
    baseline_dim = EMBEDDING_DIM
    baseline_description = ("YAMNet 1024-d embedding (global average pool of block 14 per "
                            "patch), mean + max over patches")

    def __init__(self, preset, network: torch.nn.Module, weights_id: str):
        super().__init__(preset)
        self.net = network.eval()
        self.weights_id = weights_id
        fe = preset.frontend
        self.window_length, self.hop_samples = frontends.frame_samples(
            preset.sample_rate, float(fe["window_length_s"]), float(fe["hop_length_s"]))
        self.patch_frames = int(fe["patch_frames"])
        self.patch_hop_frames = int(fe["patch_hop_frames"])
        self.layer_table = self.table(preset)
        self.reference_stride = self.layer_table[-1].time_stride  # block 14: 0.32 s
        if self.patch_frames % self.reference_stride:
            raise ValueError(f"patch_frames {self.patch_frames} is not a multiple of block 14's "
                             f"stride {self.reference_stride}")
        self.patch_hop_samples = self.patch_hop_frames * self.hop_samples  # 7680
        # One patch plus the rest of its last STFT window (15600 at 16 kHz), as pad_waveform.
        self.min_samples = (self.patch_frames - 1) * self.hop_samples + self.window_length
        # Windows of long clips start on patch hops; a window reads what its last patch needs,
        # so it yields exactly the whole clip's patches that start inside it.
        self.window_align = self.patch_hop_samples
        self.lookahead_samples = self.min_samples - self.patch_hop_samples  # 7920

    @classmethod
    def table(cls, preset, weights=None) -> tuple[LayerInfo, ...]:
        fe = preset.frontend
        return _layer_table(int(fe["patch_frames"]), int(fe["mel_bins"]))

    @staticmethod
    def network(random_init: bool = True) -> torch.nn.Module:
        """The package's YAMNet (its yamnet/__init__ imports only the model and its
        torchaudio-based input module: no network, no files), randomly initialised or, with
        random_init=False, with uninitialised weights that a strict load then overwrites."""
        model = import_module_skipping_package_init("torch_vggish_yamnet", "yamnet.model")
        with contextlib.nullcontext() if random_init else skip_random_init():
            return model.YAMNet()

    @classmethod
    def build(cls, preset, weights: str | None = None, random_init: bool = False) -> "YAMNet":
        network = cls.network(random_init)
        if random_init:
            return cls(preset, network, "random-init")
        path = checkpoint_path(weights, preset.weights.get("url"), preset.weights.get("filename"),
                               preset.name)
        state = load_torch_checkpoint(path, preset.name)
        load_state_dict_strictly(network, state, path, preset.name)
        return cls(preset, network, "sha256:" + sha256_file(path))

    # ---- front end ------------------------------------------------------------------------
    def log_mel(self, wave: torch.Tensor) -> torch.Tensor:
        """TF YAMNet's log-mel spectrogram of padded rows: [B, L] -> [B, T, mel], float32
        (computed in float64: see frontends.htk_log_mel_float64)."""
        return frontends.htk_log_mel_float64(wave, self.sample_rate, self.preset.frontend)

    def featurize(self, batch: SegmentBatch):
        """Waveforms -> (patches [N, 1, 96, 64], owner row [N]), patches in time order per row.

        Patch counts come from the host lengths (no device synchronisation)."""
        padded = [official_padded_length(n, self.min_samples, self.patch_hop_samples)
                  for n in batch.host_lengths]
        wave = batch.wave
        width = max(padded, default=self.min_samples)
        if wave.shape[1] < width:  # zeros after every row's end are the official padding
            wave = torch.nn.functional.pad(wave, (0, width - wave.shape[1]))
        patches = self.log_mel(wave).unfold(1, self.patch_frames, self.patch_hop_frames)
        first = batch.drop_left  # a window of a long clip keeps the patches starting inside it
        last = None if batch.keep is None else batch.drop_left + batch.keep
        rows, picks = [], []
        for row, length in enumerate(padded):
            frames = frontends.frame_count(length, self.window_length, self.hop_samples)
            for p in range((frames - self.patch_frames) // self.patch_hop_frames + 1):
                start = p * self.patch_hop_samples
                if start >= first and (last is None or start < last):
                    rows.append(row)
                    picks.append(p)
        device = wave.device
        owner = torch.tensor(rows, dtype=torch.long).to(device, non_blocking=True)
        index = torch.tensor(picks, dtype=torch.long).to(device, non_blocking=True)
        x = patches[owner, index]  # [N, mel, 96]
        return x.transpose(1, 2).unsqueeze(1).contiguous(), owner  # [N, 1, 96, 64], [N]

    # ---- network --------------------------------------------------------------------------
    def forward_taps(self, features, taps, baseline, batch):
        x, owner = features
        deepest = self.deepest(taps, len(BLOCKS), baseline)

        def network_rows(x):
            out = {}
            for number in range(1, deepest + 1):
                x = getattr(self.net, f"layer{number}")(x)  # ReLU is not in place: no clone
                if number in taps:
                    out[number] = flatten_channels_major(x)
            if baseline:  # one 1024-d vector per patch = adaptive_avg_pool2d(x, 1), as forward
                out[BASELINE] = x.mean(dim=(2, 3)).unsqueeze(-1)
            return out

        out = {}
        for key, frames in self.rows_in_chunks(x, network_rows).items():
            # the baseline is given at the reference rate (no repeat)
            stride = self.reference_stride if key == BASELINE else self.layer(key).time_stride
            out[key] = LayerFrames.whole(frames, stride, owner)
        return out

    def classify(self, features) -> tuple[torch.Tensor, torch.Tensor]:
        """Per patch: (embedding [N, 1024], logits [N, 521]) from the package's own forward."""
        x, _ = features
        embedding, logits = self.net(x)
        return embedding.flatten(1), logits


BACKBONE = YAMNet
