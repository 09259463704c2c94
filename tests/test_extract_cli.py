"""`fusefeat extract` end to end, as a user runs it: real audio in, HDF5 out, read back."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
import soundfile as sf

from conftest import FSDD, NSYNTH, read_wave, run_cli, summary_of

import fusefeat


@pytest.fixture
def cnn14(random_checkpoints):
    return random_checkpoints("cnn14")


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, random_checkpoints):
    """One extraction of five real clips (8 and 16 kHz, nested folders) shared by several tests:
    three shards of at most two rows, with per-layer vectors."""
    root = tmp_path_factory.mktemp("extracted")
    inputs = root / "wavs"
    (inputs / "speech").mkdir(parents=True)
    (inputs / "notes").mkdir()
    for name in ("0_george_0.wav", "3_jackson_12.wav", "7_theo_3.wav"):
        shutil.copy(FSDD / name, inputs / "speech" / name)
    for path in sorted(NSYNTH.iterdir())[:2]:
        shutil.copy(path, inputs / "notes" / path.name)
    out = root / "feats"
    result = run_cli("extract", inputs, "--model", "cnn14", "--weights",
                     random_checkpoints("cnn14"), "--out", out, "--shard-size", "2",
                     "--save-layers", check=0)
    return inputs, out, summary_of(result)


def test_directory_to_hdf5_contract(extracted):
    inputs, out, summary = extracted
    assert summary["status"] == "complete" and summary["extracted"] == 5
    assert summary["dim"] == 6144 and summary["output"] == str(out)
    shards = sorted(out.glob("shard-*.h5"))
    assert len(shards) == 3
    paths = []
    for shard in shards:
        with h5py.File(shard, "r") as f:
            paths += list(f["path"].asstr()[:])
    with h5py.File(shards[0], "r") as f:  # plain h5py, no fusefeat
        assert f["embeddings"].dtype == np.float32 and f["embeddings"].shape == (2, 6144)
        assert sorted(paths) == sorted(["speech/0_george_0.wav", "speech/3_jackson_12.wav",
                                        "speech/7_theo_3.wav"]
                                       + [f"notes/{p.name}" for p in sorted(NSYNTH.iterdir())[:2]])
        assert f["duration_s"].dtype == np.float64 and f["sample_rate"].dtype.kind == "i"
        attrs = f.attrs
        assert attrs["model"] == "cnn14" and attrs["dim"] == 6144
        assert json.loads(attrs["layers"]) == [3, 6]
        assert json.loads(attrs["layer_modules"]) == {"3": "conv_block3", "6": "conv_block6"}
        assert attrs["weights_id"].startswith("sha256:")
        for key in ("fusefeat_version", "torch_version", "torchaudio_version",
                    "transformers_version", "config", "fingerprint"):
            assert attrs[key], key
        assert json.loads(attrs["config"])["model"] == "cnn14"
    feats = fusefeat.load(out)
    assert feats.paths == sorted(paths)
    assert np.asarray(feats.embeddings).shape == (5, 6144)
    assert feats.meta["model"] == "cnn14"
    assert np.isfinite(np.asarray(feats.embeddings)).all()
    index = feats.paths.index("speech/0_george_0.wav")
    wave, rate = read_wave(FSDD / "0_george_0.wav")
    assert feats.sample_rate[index] == 8000
    assert feats.duration_s[index] == pytest.approx(len(wave) / rate)
    assert feats.embeddings[index:index + 1].shape == (1, 6144)  # lazy rows


def test_same_run_twice_gives_identical_vectors(tmp_path, extracted, cnn14):
    inputs, out, _ = extracted
    """Bit-identical, whatever the number of decoding workers (results are handed out in
    input order, so batches are the same); and batch-invariant: a clip alone in its batch gives
    its vector within 1e-5 relative (batched convolutions round differently)."""
    run_cli("extract", inputs, "-m", "cnn14", "-w", cnn14, "-o", tmp_path / "again",
            "--num-workers", "0", "--save-layers", check=0)
    run_cli("extract", inputs, "-m", "cnn14", "-w", cnn14, "-o", tmp_path / "alone",
            "--num-workers", "3", "--batch-size", "1", check=0)
    a, b, c = (fusefeat.load(p) for p in (out, tmp_path / "again", tmp_path / "alone"))
    assert a.paths == b.paths == c.paths
    np.testing.assert_array_equal(np.asarray(a.embeddings), np.asarray(b.embeddings))
    A, C = np.asarray(a.embeddings), np.asarray(c.embeddings)
    worst = max(np.linalg.norm(A[i] - C[i]) / np.linalg.norm(C[i]) for i in range(len(A)))
    assert worst <= 1e-5, worst


def test_formats_rates_channels(tmp_path, random_checkpoints):
    """FLAC, OGG, stereo, 44.1 kHz variants made from real audio give the same vectors as the
    16 kHz mono original within resampling tolerance, and exactly for lossless 16 kHz copies."""
    src = sorted(NSYNTH.iterdir())[5]
    wave, rate = read_wave(src)
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(src, inputs / "orig.wav")
    sf.write(inputs / "copy.flac", wave, rate)
    sf.write(inputs / "stereo.wav", np.stack([wave, wave], axis=1), rate)
    sf.write(inputs / "vorbis.ogg", wave, rate)
    import torch
    import torchaudio

    up = torchaudio.functional.resample(torch.from_numpy(wave), rate, 44100).numpy()
    sf.write(inputs / "up44k.wav", up, 44100, subtype="FLOAT")
    out = tmp_path / "out"
    run_cli("extract", inputs, "-m", "vggish", "-w", random_checkpoints("vggish"), "-o", out,
            check=0)
    feats = fusefeat.load(out)
    vec = dict(zip(feats.paths, np.asarray(feats.embeddings)))
    rates = dict(zip(feats.paths, feats.sample_rate))
    assert rates["up44k.wav"] == 44100 and rates["orig.wav"] == 16000
    np.testing.assert_allclose(vec["copy.flac"], vec["orig.wav"], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(vec["stereo.wav"], vec["orig.wav"], rtol=1e-5, atol=1e-5)

    def rel(a, b):
        return np.linalg.norm(a - b) / np.linalg.norm(b)

    assert rel(vec["vorbis.ogg"], vec["orig.wav"]) < 0.1  # lossy
    assert rel(vec["up44k.wav"], vec["orig.wav"]) < 0.02  # resampled twice


def test_files_from_stdin_and_layers(tmp_path, wav_dir, cnn14):
    listing = "\n".join(str(p) for p in sorted(wav_dir.rglob("*.wav"))[:3]) + "\n"
    out = tmp_path / "out"
    result = run_cli("extract", "--files-from", "-", "-m", "cnn14", "-w", cnn14, "-o", out,
                     "--layers", "2,-1", "--save-layers", input=listing, check=0)
    assert summary_of(result)["layers"] == [2, 6]
    feats = fusefeat.load(out)
    assert all(p.startswith("/") for p in feats.paths)  # absolute as listed
    assert feats.embeddings.shape == (3, 2048 + 4096)
    fused = np.asarray(feats.embeddings)
    own = np.concatenate([np.asarray(feats.layers[2]), np.asarray(feats.layers[6])], axis=1)
    np.testing.assert_array_equal(fused, own)  # fusion = concatenated per-layer vectors


def test_clip_seconds_and_extras(tmp_path, wav_dir, cnn14):
    out = tmp_path / "out"
    run_cli("extract", wav_dir, "-m", "cnn14", "-w", cnn14, "-o", out, "--clip-seconds", "1.5",
            "--baseline", "--save-frames", "--batch-size", "8", check=0)
    feats = fusefeat.load(out)
    assert feats.baseline.shape == (5, 2048)
    frames = feats.frames(0)
    # 1.5 s -> 151 STFT frames -> 4 frames of 320 ms after block 6
    assert frames.shape == (151 // 32, 6144)
    pooled = frames.mean(axis=0) + frames.max(axis=0)
    np.testing.assert_allclose(pooled, feats.embeddings[0], rtol=1e-5, atol=1e-5)
    # durations are those of the original audio, not of the cropped clip
    assert feats.duration_s.max() == pytest.approx(4.0)


def test_resume_skips_and_refuses_other_settings(tmp_path, extracted, cnn14):
    inputs, original, _ = extracted
    out = tmp_path / "out"
    shutil.copytree(original, out)
    again = summary_of(run_cli("extract", inputs, "-m", "cnn14", "-w", cnn14, "-o", out,
                               "--save-layers", check=0))
    assert again["extracted"] == 0 and again["skipped"] == 5
    other = run_cli("extract", inputs, "-m", "cnn14", "-w", cnn14, "-o", out, "--layers", "4,6",
                    "--save-layers")
    assert other.returncode == 1
    assert "layers: [3, 6] (in the directory) vs [4, 6] (now)" in other.stderr
    assert "--overwrite" in other.stderr and "Traceback" not in other.stderr
    fresh = run_cli("extract", inputs, "-m", "cnn14", "-w", cnn14, "-o", out, "--layers", "4,6",
                    "--overwrite", check=0)
    assert summary_of(fresh)["extracted"] == 5


def test_info_and_merge(tmp_path, extracted):
    _, out, _ = extracted
    report = json.loads(run_cli("info", out, "--json", check=0).stdout)
    assert report["committed"] == 5 and report["failed"] == 0 and report["pending"] == 0
    assert report["model"] == "cnn14" and report["dim"] == 6144 and report["shards"] == 3
    text = run_cli("info", out, check=0).stdout
    assert "committed: 5" in text
    feats = fusefeat.load(out)
    for virtual in (False, True):
        merged = tmp_path / f"merged{int(virtual)}.h5"
        args = ["merge", out, "-o", merged] + (["--virtual"] if virtual else [])
        result = json.loads(run_cli(*args, check=0).stdout)
        assert result["rows"] == 5
        with h5py.File(merged, "r") as f:
            assert list(f["path"].asstr()[:]) == feats.paths  # rows in input (path) order
            np.testing.assert_array_equal(f["embeddings"][:], np.asarray(feats.embeddings))
            np.testing.assert_array_equal(f["layers/3"][:], np.asarray(feats.layers[3]))
        again = fusefeat.load(merged)
        assert again.paths == feats.paths


def test_help_is_fast_and_documents_exit_codes():
    import subprocess
    import sys
    import time

    start = time.perf_counter()
    result = run_cli("--help", check=0)
    assert time.perf_counter() - start < 3.0  # a subprocess; the import itself is < 0.5 s
    assert "extract" in result.stdout
    code = ("import time, sys; t = time.perf_counter(); import fusefeat.cli; "
            "print(time.perf_counter() - t); print('torch' in sys.modules)")
    lines = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True).stdout.split()
    assert float(lines[0]) < 0.5 and lines[1] == "False"
    assert "75 interrupted" in run_cli("extract", "--help", check=0).stdout


def test_bf16_on_cpu_close_to_fp32_and_fp16_refused(tmp_path, wav_dir, random_checkpoints):
    """bf16 autocast runs on the CPU too (stored as float32, recorded in the config); its vectors
    stay near fp32's (measured: relative error 3-5e-3 for random-weight VGGish/CNN14, ≤ 2.5e-2
    for YAMNet's real weights). fp16 has no fast CPU path: refused before anything loads."""
    weights = random_checkpoints("vggish")
    runs = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        run_cli("extract", wav_dir, "-m", "vggish", "-w", weights, "-o", out,
                "--precision", precision, check=0)
        runs[precision] = fusefeat.load(out)
    a, b = (np.asarray(runs[p].embeddings) for p in ("fp32", "bf16"))
    assert b.dtype == np.float32 and runs["bf16"].paths == runs["fp32"].paths
    assert runs["bf16"].meta["config"]["precision"] == "bf16"
    rel = [np.linalg.norm(a[i] - b[i]) / np.linalg.norm(a[i]) for i in range(len(a))]
    assert 0 < max(rel) < 2e-2, rel  # not fp32 under another name, and close
    mixed = run_cli("extract", wav_dir, "-m", "vggish", "-w", weights, "-o", tmp_path / "fp32",
                    "--precision", "bf16")
    assert mixed.returncode == 1 and "precision" in mixed.stderr  # no mixing in one directory
    refused = run_cli("extract", wav_dir, "-m", "vggish", "-w", weights, "-o", tmp_path / "x",
                      "--precision", "fp16", "--device", "cpu")
    assert refused.returncode == 2 and "CUDA" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "x").exists()
