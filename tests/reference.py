"""Independent, plainly written per-clip implementations of the paper's recipe.

Written from paper.md and the official code's procedure (nttcslab/composing-general-audio-repr),
one clip at a time, without fusefeat's front ends, fusion, batching or windowing. The tests
compare the CLI's output with these.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio


def official_module(package: str, submodule: str):
    """The package's module without its __init__ (panns_inference's runs wget)."""
    alias = f"_test_shadow_{package}"
    if alias not in sys.modules:
        spec = importlib.util.find_spec(package)
        shadow = types.ModuleType(alias)
        shadow.__path__ = list(spec.submodule_search_locations)
        sys.modules[alias] = shadow
    return importlib.import_module(f"{alias}.{submodule}")


def to_16k(wave: np.ndarray, rate: int) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(wave, dtype=np.float32))
    return x if rate == 16000 else torchaudio.functional.resample(x, rate, 16000)


def mean_max(frames: torch.Tensor) -> torch.Tensor:  # [D, T] -> [D]
    return frames.max(dim=-1).values + frames.mean(dim=-1)


def along_time(x: torch.Tensor) -> torch.Tensor:  # [1, C, T, F] -> [C*F, T]
    _, c, t, f = x.shape
    return x.transpose(2, 3).reshape(c * f, t)


# ---- CNN14 (official: GeneralPurposeCnn14.encode_frames) -----------------------------------
def cnn14_load(path):
    models = official_module("panns_inference", "models")
    net = models.Cnn14(sample_rate=16000, window_size=512, hop_size=160, mel_bins=64, fmin=50,
                       fmax=8000, classes_num=527)
    net.load_state_dict(torch.load(path, map_location="cpu")["model"])
    return net.eval()


@torch.no_grad()
def cnn14_clip(net, wave16: torch.Tensor, layers=(3, 6), baseline=False):
    x = net.logmel_extractor(net.spectrogram_extractor(wave16[None]))
    x = net.bn0(x.transpose(1, 3)).transpose(1, 3)
    kernels = {1: 16, 2: 8, 3: 4, 4: 2}
    outs = []
    for block in range(1, 7):
        x = getattr(net, f"conv_block{block}")(x, pool_size=(2, 2) if block < 6 else (1, 1),
                                             pool_type="avg")
        if block in layers:
            y = F.max_pool2d(x, kernel_size=(kernels[block], 1)) if block in kernels else x.clone()
            outs.append(along_time(y))
    fused = mean_max(torch.cat(outs, dim=0))
    if not baseline:
        return fused.numpy()
    pooled = mean_max(x.mean(dim=3)[0])
    return fused.numpy(), F.relu(net.fc1(pooled)).numpy()


# ---- VGGish (official: GeneralPurposeVGGish.encode_frames over vggish_input examples) -------
def vggish_load(path):
    tv = official_module("torchvggish", "torchvggish")
    net = tv.VGG(tv.make_layers(), postprocess=False)
    net.load_state_dict(torch.load(path, map_location="cpu"))
    return net.eval()


def vggish_examples(wave16: np.ndarray) -> torch.Tensor:
    vggish_input = official_module("torchvggish", "vggish_input")
    examples = vggish_input.waveform_to_examples(np.asarray(wave16, dtype=np.float64), 16000,
                                                 return_tensor=False)
    return torch.tensor(np.asarray(examples)).float()[:, None]  # [E, 1, 96, 64]


@torch.no_grad()
def vggish_clip(net, examples: torch.Tensor, layers=(10, 15)):
    zero_based = [n - 1 for n in layers]
    per_example = []
    for e in range(examples.shape[0]):
        x = examples[e:e + 1]
        features, stride = [], 16
        for index, module in enumerate(net.features.children()):
            x = module(x)
            if index in (2, 5, 10, 15):
                stride //= 2
            if index in zero_based:
                y = F.max_pool2d(x, kernel_size=(stride, 1), stride=(stride, 1)) if stride > 1 else x.clone()
                features.append(along_time(y))
        x = x.permute(0, 2, 3, 1).reshape(1, -1)
        for index, module in enumerate(net.embeddings.children(), start=16):
            x = module(x)
            if index in zero_based:
                features.append(x[0].unsqueeze(-1).expand(-1, 6).clone())
        per_example.append(torch.cat(features, dim=0))  # [D, 6]
    return mean_max(torch.cat(per_example, dim=1)).numpy()


# ---- AST (official: AR_AST_Fusion.forward with ASTModel(input_tdim=T) positions) ------------
AST_MEAN, AST_STD = -4.2677393, 4.5689974


@torch.no_grad()
def ast_clip(model, wave16: torch.Tensor, layers=(5, 12)):
    w = (wave16 - wave16.mean())[None]
    fbank = torchaudio.compliance.kaldi.fbank(w, htk_compat=True, sample_frequency=16000,
                                              use_energy=False, window_type="hanning",
                                              num_mel_bins=128, dither=0.0, frame_shift=10)
    x = (fbank - AST_MEAN) / (AST_STD * 2)  # [T, 128]
    t_dim = (x.shape[0] - 16) // 10 + 1
    emb = model.embeddings
    width = emb.position_embeddings.shape[-1]
    grid = emb.position_embeddings[:, 2:, :].reshape(1, 1212, width).transpose(1, 2).reshape(1, width, 12, 101)
    if t_dim < 101:
        grid = grid[:, :, :, 50 - int(t_dim / 2): 50 - int(t_dim / 2) + t_dim]
    else:
        grid = F.interpolate(grid, size=(12, t_dim), mode="bilinear")
    grid = grid.reshape(1, width, 12 * t_dim).transpose(1, 2)
    positions = torch.cat([emb.position_embeddings[:, :2, :], grid], dim=1)
    h = x[None].unsqueeze(1).transpose(2, 3)  # [1, 1, 128, T]
    h = emb.patch_embeddings.projection(h).flatten(2).transpose(1, 2)
    h = torch.cat([emb.cls_token, emb.distillation_token, h], dim=1) + positions
    out = []
    for index, block in enumerate(model.layers):
        h = block(h)
        if index + 1 in layers:
            n = model.layernorm(h)
            out.append((n[:, 0] + n[:, 1]) / 2)
    return torch.cat(out, dim=1)[0].numpy()


def relative_error(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))
