"""Shared test fixtures: real audio from ../shared/data, random-weight checkpoints in each
backbone's official format, and the CLI run the way a user runs it (a subprocess)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data"
FSDD = DATA / "fsdd" / "wav"
NSYNTH = DATA / "nsynth_mini60" / "audio"
MODELS = SHARED / "models"


def fsdd_by_speaker(root: Path, names) -> Path:
    """Copy FSDD clips into root/<speaker>/<name> (a nested corpus, as users keep theirs)."""
    for name in names:
        speaker = root / name.split("_")[1]
        speaker.mkdir(parents=True, exist_ok=True)
        shutil.copy(FSDD / name, speaker / name)
    return root


def run_cli(*args, cwd=None, input=None, env=None, timeout=600, check=None):
    """Run `fusefeat ARGS...` in a subprocess, as a user would (python -m fusefeat)."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.setdefault("OMP_NUM_THREADS", "2")
    full_env["HF_HUB_OFFLINE"] = "1"
    if env:
        full_env.update(env)
    result = subprocess.run([sys.executable, "-m", "fusefeat", *map(str, args)], cwd=cwd,
                            input=input, env=full_env, capture_output=True, text=True,
                            timeout=timeout)
    if check is not None and result.returncode != check:
        raise AssertionError(f"fusefeat {' '.join(map(str, args))} exited {result.returncode} "
                             f"(expected {check})\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


def summary_of(result) -> dict:
    import json

    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON summary on stdout:\n{result.stdout}\n{result.stderr}"
    return json.loads(lines[-1])


@pytest.fixture(scope="session")
def random_checkpoints(tmp_path_factory):
    """Random-weight checkpoints in the official formats, built once per session (lazily)."""
    import torch

    from fusefeat.config import load_preset

    root = tmp_path_factory.mktemp("weights")
    made = {}

    def get(model: str) -> Path:
        if model in made:
            return made[model]
        torch.manual_seed(1234)
        preset = load_preset(model)
        if model == "cnn14":
            from fusefeat.backbones.cnn14 import Cnn14

            net = Cnn14.build(preset, random_init=True).net
            with torch.no_grad():  # PANNs initialises BatchNorm to identity: make bn0 tell
                net.bn0.running_mean.normal_(0.0, 2.0)
                net.bn0.running_var.uniform_(0.5, 4.0)
            path = root / "Cnn14_16k_random.pth"
            torch.save({"model": net.state_dict()}, path)  # PANNs checkpoint format
        elif model == "vggish":
            from fusefeat.backbones.vggish import VGGish

            net = VGGish.build(preset, random_init=True).net
            path = root / "vggish_random.pth"
            torch.save(net.state_dict(), path)  # torchvggish release format
        elif model == "ast":
            from transformers import ASTConfig, ASTForAudioClassification

            config = ASTConfig(num_hidden_layers=12, hidden_size=96, num_attention_heads=4,
                               intermediate_size=192, num_labels=527)
            path = root / "ast_random"
            model = ASTForAudioClassification(config).eval()
            emb = model.audio_spectrogram_transformer.embeddings
            with torch.no_grad():  # transformers initialises these to zeros: make them tell
                for tensor in (emb.position_embeddings, emb.cls_token, emb.distillation_token):
                    tensor.normal_(0.0, 0.5)
            model.save_pretrained(path)  # hub format
        else:
            raise KeyError(model)
        made[model] = path
        return path

    return get


@pytest.fixture
def wav_dir(tmp_path):
    """A few real clips: 8 kHz speech (FSDD, resampled) and 16 kHz notes (NSynth), nested."""
    root = tmp_path / "wavs"
    (root / "speech").mkdir(parents=True)
    (root / "notes").mkdir()
    for name in ("0_george_0.wav", "3_jackson_12.wav", "7_theo_3.wav"):
        shutil.copy(FSDD / name, root / "speech" / name)
    for name in sorted(os.listdir(NSYNTH))[:2]:
        shutil.copy(NSYNTH / name, root / "notes" / name)
    return root


def read_wave(path) -> tuple[np.ndarray, int]:
    import soundfile as sf

    data, rate = sf.read(path, dtype="float32", always_2d=True)
    return data.mean(axis=1), rate
