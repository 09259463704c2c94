"""Any Hugging Face audio encoder: `--model hf:ID_OR_PATH` (a hub id through the HF cache, or a
local directory written by save_pretrained).

Loading: `AutoFeatureExtractor` + `AutoModel`; of an encoder-decoder model (Whisper) only
`get_encoder()` is kept and run.

Layers are the encoder's hidden states exactly as transformers returns them with
`output_hidden_states=True`, in the paper's 1-based grammar: 0 = hidden_states[0], the embedding
output (the input of the first block), n = hidden_states[n], the output of block n (1..L). What
layer L holds is the model's own definition: Whisper's includes the encoder's final LayerNorm
(it equals last_hidden_state); wav2vec2, HuBERT and AST give the last block's raw output (their
final LayerNorm, where they have one, is only in last_hidden_state: see the baseline). Default
fusion: the middle block (L+1)//2 and L (Whisper-base: 3 and 6).

Per-frame vectors are the hidden states' frames; the clip vector of a layer is mean_t + max_t over
the frames that cover the clip's audio only, and fusion concatenates the layers (fusefeat.fusion).
The baseline (--baseline) is the encoder's last_hidden_state pooled the same way.

The model's feature extractor decides the front end (its parameters are read from it; the
computation is redone batched in torch on the device, and tests check it against the extractor):
  whisper  WhisperFeatureExtractor: log-mel of inputs always padded to n_samples (30 s). Longer
           segments are cut into 30 s chunks, each padded and encoded alone (Whisper's own
           long-form practice); frames are 20 ms; a chunk holding d seconds of audio owns its
           first ceil(d / 0.02) frames, the rest is padding and never pooled.
  wave     Wav2Vec2FeatureExtractor (wav2vec2, HuBERT, WavLM, data2vec-audio, ...): the raw
           waveform, normalised per clip if the extractor does; valid frames from the model's
           conv output-length formula. Group-norm conv stems (wav2vec2-base, HuBERT-base) depend
           on padding, so only equal-length clips share a batch; layer-norm stems whose extractor
           returns an attention mask batch clips of any length with the mask.
  ast      ASTFeatureExtractor: Kaldi fbank padded to max_length frames (10.24 s) and normalised;
           longer segments are chunked like Whisper's. The CLS and distillation tokens are
           dropped; each patch column (10 fbank frames, 100 ms) is one frame whose vector is the
           column's patch tokens flattened channel-major, frequency-minor (the paper's
           flattening: frequency is kept, not averaged). For the paper's AST-Fusion recipe
           (CLS/distillation tokens) use `--model ast`.
Strides are counted in samples at the model's rate (the hf preset's front-end hop is 1 sample).
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from typing import Optional

import torch

from fusefeat import frontends
from fusefeat.backbones.base import (BASELINE, Backbone, LayerFrames, LayerInfo, SegmentBatch,
                                     flatten_channels_major)
from fusefeat.backbones.weights import hf_model_dir
from fusefeat.errors import UsageError, WeightsError

FAMILIES = {"WhisperFeatureExtractor": "whisper", "Wav2Vec2FeatureExtractor": "wave",
            "ASTFeatureExtractor": "ast"}


@dataclass(frozen=True)
class Spec:
    """What the layer table needs, read from config.json and preprocessor_config.json."""

    family: str
    blocks: int  # L
    width: int  # hidden size
    freq_bins: int  # patch rows per frame (AST), else 1
    stride: int  # samples per hidden-state frame
    sample_rate: int


def read_spec(config, extractor: dict, name: str) -> Spec:
    """`config`: a transformers config; `extractor`: the feature extractor's attributes."""
    kind = extractor.get("feature_extractor_type", "")
    family = FAMILIES.get(kind)
    if family == "wave" and not getattr(config, "conv_stride", None):
        family = None
    if family is None:
        raise UsageError(f"{name}: fusefeat does not know how to feed this model "
                         f"(model_type {getattr(config, 'model_type', '?')!r}, feature extractor "
                         f"{kind or 'none'!r})",
                         hint="supported: Whisper-style (WhisperFeatureExtractor), wav2vec2/HuBERT/"
                              "WavLM-style (Wav2Vec2FeatureExtractor) and AST encoders")
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    blocks = getattr(config, "encoder_layers", None) if encoder_decoder else None
    blocks = int(blocks or config.num_hidden_layers)
    width = int(getattr(config, "d_model", None) or config.hidden_size)
    rate = int(extractor.get("sampling_rate", 16000))
    freq_bins = 1
    if family == "whisper":
        stride = int(extractor["n_samples"]) // int(config.max_source_positions)
    elif family == "wave":
        stride = math.prod(int(s) for s in config.conv_stride)
    else:
        stride = int(config.time_stride) * _kaldi_hop(rate)
        freq_bins = (int(config.num_mel_bins) - int(config.patch_size)) // int(config.frequency_stride) + 1
    return Spec(family, blocks, width, freq_bins, stride, rate)


def _kaldi_hop(rate: int) -> int:
    return int(rate * 0.010)  # ASTFeatureExtractor: torchaudio's Kaldi fbank, 25 ms / 10 ms


def _kaldi_window(rate: int) -> int:
    return int(rate * 0.025)


def _table(spec: Spec) -> tuple[LayerInfo, ...]:
    frames_1s = -(-spec.sample_rate // spec.stride)
    channels = spec.width
    return tuple(LayerInfo(n, f"hidden_states[{n}]", "frames", channels, spec.freq_bins,
                           spec.stride, (channels * spec.freq_bins, frames_1s))
                 for n in range(spec.blocks + 1))


@dataclass
class Inputs:
    """A batch ready for the encoder: rows are segments, or chunks of them (owner)."""

    values: torch.Tensor
    owner: torch.Tensor  # [N] the segment each row belongs to
    valid: torch.Tensor  # [N] frames of each row that cover audio
    mask: Optional[torch.Tensor] = None  # [N, L] sample attention mask (wave family, ragged)


class HFEncoder(Backbone):
    pooling = "meanmax"
    hop_samples = 1  # strides are in samples
    baseline_description = "the encoder's last_hidden_state, mean_t + max_t over the clip's frames"

    def __init__(self, preset, network: torch.nn.Module, extractor, spec: Spec, weights_id: str):
        super().__init__(preset)
        self.net = network.eval()
        self.extractor = extractor
        self.spec = spec
        self.weights_id = weights_id
        self.sample_rate = spec.sample_rate
        self.layer_table = _table(spec)
        self.reference_stride = spec.stride
        self.baseline_dim = spec.width * spec.freq_bins
        self.input_name = getattr(network, "main_input_name", "input_values")
        self.chunk: Optional[int] = None  # fixed input length in samples (whisper, ast)
        self.window_align = spec.stride
        if spec.family == "whisper":
            self.chunk = int(extractor.n_samples)
            self.ragged_batches = True  # every row is padded to the chunk anyway
            self.register_buffer("mel_filters", torch.tensor(extractor.mel_filters, dtype=torch.float32),
                                 persistent=False)
        elif spec.family == "ast":
            self.chunk = int(extractor.max_length) * _kaldi_hop(spec.sample_rate)
            self.ragged_batches = True
            self.min_samples = _kaldi_window(spec.sample_rate)  # one fbank frame
        else:
            cfg = network.config
            self.use_mask = (getattr(cfg, "feat_extract_norm", "group") == "layer"
                             and bool(getattr(extractor, "return_attention_mask", False)))
            self.ragged_batches = self.use_mask
            self.conv = [(int(k), int(s)) for k, s in zip(cfg.conv_kernel, cfg.conv_stride)]
            receptive = 1
            for kernel, stride in reversed(self.conv):
                receptive = (receptive - 1) * stride + kernel
            self.min_samples = receptive  # one frame
        if self.chunk is not None:
            # Windows of long clips are whole chunks, so chunks tile every clip from its start.
            self.window_align = self.chunk
        self._blocks = _find_blocks(network, spec.blocks)

    # ---- description ------------------------------------------------------------------------
    @classmethod
    def default_layers(cls, preset, table) -> tuple[int, ...]:
        last = table[-1].number
        return tuple(sorted({max(1, (last + 1) // 2), last}))

    @classmethod
    def table(cls, preset, weights=None) -> tuple[LayerInfo, ...]:
        from transformers import AutoConfig

        directory, _ = hf_model_dir(preset.weights["hf_repo"], preset.weights.get("revision"),
                                    weights, preset.name, identify=False)
        config = AutoConfig.from_pretrained(directory)
        extractor_file = directory / "preprocessor_config.json"
        try:
            extractor = json.loads(extractor_file.read_text())
        except (OSError, ValueError):
            extractor = {}
        return _table(read_spec(config, extractor, preset.name))

    @classmethod
    def build(cls, preset, weights: str | None = None, random_init: bool = False) -> "HFEncoder":
        from transformers import AutoConfig, AutoFeatureExtractor, AutoModel
        from transformers.utils import logging as hf_logging

        directory, identity = hf_model_dir(preset.weights["hf_repo"], preset.weights.get("revision"),
                                           weights, preset.name)
        try:
            extractor = AutoFeatureExtractor.from_pretrained(directory)
        except (OSError, ValueError) as exc:
            raise WeightsError(f"cannot load the feature extractor of {preset.name}: {exc}",
                               hint="the directory needs preprocessor_config.json "
                                    "(FeatureExtractor.save_pretrained)") from None
        verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()  # the decoder of an encoder-only Whisper is absent
        hf_logging.disable_progress_bar()
        try:
            if random_init:
                model = AutoModel.from_config(AutoConfig.from_pretrained(directory))
                missing, identity = [], "random-init"
            else:
                model, info = AutoModel.from_pretrained(directory, output_loading_info=True)
                missing = list(info.get("missing_keys", []))
        except (OSError, ValueError) as exc:
            raise WeightsError(f"cannot load {preset.name}: {exc}") from None
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
        config = model.config
        encoder = model.get_encoder() if getattr(config, "is_encoder_decoder", False) else model
        prefix = "encoder." if encoder is not model else ""
        lost = [k for k in missing if k.startswith(prefix)
                and not any(part in k for part in ("masked_spec_embed", "pooler"))]
        if lost:
            raise WeightsError(f"{directory} lacks {len(lost)} encoder weights (e.g. {lost[0]}); "
                               "the encoder would be random",
                               hint="pass a directory written by save_pretrained() of this model")
        attributes = {"feature_extractor_type": type(extractor).__name__,
                      **{k: getattr(extractor, k) for k in ("sampling_rate", "n_samples")
                         if hasattr(extractor, k)}}
        spec = read_spec(config, attributes, preset.name)
        return cls(preset, encoder, extractor, spec, identity)

    # ---- computation --------------------------------------------------------------------------
    def featurize(self, batch: SegmentBatch) -> Inputs:
        family = self.spec.family
        if family == "wave":
            return self._wave_inputs(batch)
        rows, owner, samples = _chunks(batch.wave, batch.lengths, self.chunk, self.min_samples)
        if family == "whisper":
            values = frontends.whisper_log_mel(rows, self.mel_filters, int(self.extractor.n_fft),
                                               int(self.extractor.hop_length))
            frames = values.shape[-1] * int(self.extractor.hop_length) // self.spec.stride
            valid = (-(-samples // self.spec.stride)).clamp(1, frames)
            return Inputs(values, owner, valid)
        return self._ast_inputs(rows, owner, samples)

    def _wave_inputs(self, batch: SegmentBatch) -> Inputs:
        wave, lengths = batch.wave, batch.lengths
        if getattr(self.extractor, "do_normalize", False):
            wave = frontends.zero_mean_unit_var(wave, lengths)
        mask = None
        if self.use_mask:
            mask = (torch.arange(wave.shape[-1], device=wave.device)[None, :]
                    < lengths[:, None]).long()
        valid = lengths
        for kernel, stride in self.conv:  # the conv stem's output length, layer by layer
            valid = (valid - kernel) // stride + 1
        owner = torch.arange(wave.shape[0], device=wave.device)
        return Inputs(wave, owner, valid.long(), mask)

    def _ast_inputs(self, rows, owner, samples) -> Inputs:
        ex, rate = self.extractor, self.spec.sample_rate
        window, hop = _kaldi_window(rate), _kaldi_hop(rate)
        fbank = frontends.kaldi_fbank(rows, rate, int(ex.num_mel_bins), 25.0, 10.0, "hanning")
        frames = frontends.frame_count(samples, window, hop)  # each chunk's own frames
        keep = torch.arange(fbank.shape[1], device=fbank.device)[None, :] < frames[:, None]
        fbank = fbank * keep[..., None]  # the extractor zero-pads after a clip's own frames
        fbank = torch.nn.functional.pad(fbank, (0, 0, 0, int(ex.max_length) - fbank.shape[1]))
        if getattr(ex, "do_normalize", True):
            fbank = (fbank - float(ex.mean)) / (2.0 * float(ex.std))
        cfg = self.net.config
        columns = (int(ex.max_length) - int(cfg.patch_size)) // int(cfg.time_stride) + 1
        valid = (-(-frames // int(cfg.time_stride))).clamp(1, columns)
        return Inputs(fbank, owner, valid)

    def forward_taps(self, features: Inputs, taps, baseline, batch):
        deepest = self.spec.blocks if baseline else max(taps)
        kwargs = {self.input_name: features.values, "output_hidden_states": True}
        if features.mask is not None:
            kwargs["attention_mask"] = features.mask
        with self._only_blocks(deepest + 1):
            output = self.net(**kwargs)
        hidden = output.hidden_states
        out = {n: LayerFrames(self._frames(hidden[n]), self.spec.stride, features.owner,
                              features.valid) for n in taps}
        if baseline:
            out[BASELINE] = LayerFrames(self._frames(output.last_hidden_state), self.spec.stride,
                                        features.owner, features.valid)
        return out

    def _frames(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, T, D] hidden states -> [N, D * F, T] frames."""
        if self.spec.family != "ast":
            return hidden.transpose(1, 2)
        n, _, width = hidden.shape
        patches = hidden[:, 2:]  # drop CLS and distillation; patches are frequency-major
        grid = patches.reshape(n, self.spec.freq_bins, -1, width)  # [N, F, T, D]
        return flatten_channels_major(grid.permute(0, 3, 2, 1))  # [N, D, T, F] -> [N, D*F, T]

    @contextlib.contextmanager
    def _only_blocks(self, count: int):
        """Run only the first `count` blocks (hidden states up to count - 1 stay exact: the
        model may post-process the last one it returns)."""
        if self._blocks is None or count >= self.spec.blocks:
            yield
            return
        parent, name, blocks = self._blocks
        setattr(parent, name, torch.nn.ModuleList(list(blocks)[:count]))
        try:
            yield
        finally:
            setattr(parent, name, blocks)


def _chunks(wave: torch.Tensor, lengths: torch.Tensor, size: int, least: int = 1):
    """Cut each row into chunks of `size` samples from its start (the last zero-padded; a tail
    shorter than `least` samples, too short for one frame, is left out): rows [N, size], the
    row each chunk came from [N], and the audio samples in each chunk [N]."""
    b = wave.shape[0]
    counts = (1 + (lengths - least) // size).clamp(min=1)
    most = int(counts.max())
    padded = torch.nn.functional.pad(wave, (0, most * size - wave.shape[1]))
    owner = torch.repeat_interleave(torch.arange(b, device=wave.device), counts)
    first = torch.cumsum(counts, 0) - counts
    index = torch.arange(owner.shape[0], device=wave.device) - first[owner]
    rows = padded.reshape(b, most, size)[owner, index]
    samples = (lengths[owner] - index * size).clamp(min=0, max=size)
    return rows, owner, samples


def _find_blocks(network: torch.nn.Module, blocks: int):
    """(parent module, attribute, ModuleList) of the encoder's blocks, or None if unclear."""
    found = []
    for path, module in network.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == blocks \
                and path.rsplit(".", 1)[-1] in ("layers", "layer"):
            parent = network.get_submodule(path.rsplit(".", 1)[0]) if "." in path else network
            found.append((parent, path.rsplit(".", 1)[-1], module))
    return found[0] if len(found) == 1 else None


BACKBONE = HFEncoder
