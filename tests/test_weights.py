"""Weights: official formats through --weights, a clear error offline (within seconds), and
clear errors for a wrong or corrupted file."""

from __future__ import annotations

import time

import pytest

from conftest import run_cli


@pytest.fixture
def offline_env(tmp_path):
    # an empty cache; the sandbox has no route to the internet, as a user's offline node
    return {"TORCH_HOME": str(tmp_path / "torch"), "HF_HOME": str(tmp_path / "hf"),
            "HF_HUB_OFFLINE": "0"}


@pytest.mark.parametrize("model, names", [
    ("cnn14", ["https://zenodo.org/record/3987831/files/Cnn14_16k_mAP%3D0.438.pth", "--weights"]),
    ("vggish", ["vggish-10086976.pth", "--weights"]),
    ("ast", ["MIT/ast-finetuned-audioset-10-10-0.4593", "--weights"]),
])
def test_offline_without_cache_fails_fast_and_says_what_to_do(tmp_path, wav_dir, offline_env,
                                                              model, names):
    start = time.monotonic()
    result = run_cli("extract", wav_dir, "--model", model, "--out", tmp_path / "o",
                     env=offline_env)
    elapsed = time.monotonic() - start
    assert result.returncode == 1, result.stderr
    for name in names:
        assert name in result.stderr
    assert "Traceback" not in result.stderr
    assert elapsed < 30, elapsed  # process start and imports included; the network part is < 10 s


def test_hf_offline_flag_is_honoured_immediately(tmp_path, wav_dir, offline_env):
    env = dict(offline_env, HF_HUB_OFFLINE="1")
    result = run_cli("extract", wav_dir, "--model", "ast", "--out", tmp_path / "o", env=env)
    assert result.returncode == 1 and "HF_HUB_OFFLINE" in result.stderr


def test_weights_of_another_model(tmp_path, wav_dir, random_checkpoints):
    result = run_cli("extract", wav_dir, "--model", "vggish", "--weights",
                     random_checkpoints("cnn14"), "--out", tmp_path / "o")
    assert result.returncode == 1
    assert "is not a vggish checkpoint" in result.stderr and "missing" in result.stderr
    assert "Traceback" not in result.stderr
    ast_dir = random_checkpoints("ast")
    result = run_cli("extract", wav_dir, "--model", "cnn14", "--weights", ast_dir,
                     "--out", tmp_path / "o2")
    assert result.returncode == 1 and "Traceback" not in result.stderr


def test_corrupted_weights_file(tmp_path, wav_dir, random_checkpoints):
    good = random_checkpoints("cnn14").read_bytes()
    broken = tmp_path / "broken.pth"
    broken.write_bytes(good[: len(good) // 3])
    result = run_cli("extract", wav_dir, "--model", "cnn14", "--weights", broken,
                     "--out", tmp_path / "o")
    assert result.returncode == 1
    assert "cannot read" in result.stderr and "corrupt" in result.stderr
    assert "Traceback" not in result.stderr
    missing = run_cli("extract", wav_dir, "--model", "cnn14", "--weights", tmp_path / "nope.pth",
                      "--out", tmp_path / "o3")
    assert missing.returncode == 1 and "weights file not found" in missing.stderr
