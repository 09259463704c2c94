"""YAMNet with its real AudioSet weights (../shared/models/yamnet/yamnet.pth).

The front end is checked against a plain numpy transcription of TF YAMNet's features.py written
here (not fusefeat's front-end code), the fused vectors against a per-clip, per-patch reference,
the classifier on speech, windowing of a long clip against one pass, and a small linear probe.
"""

from __future__ import annotations

import csv
import os
import shutil
import time

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

from conftest import FSDD, MODELS, NSYNTH, read_wave, run_cli, summary_of

YAMNET_DIR = MODELS / "yamnet"
WEIGHTS = YAMNET_DIR / "yamnet.pth"
LABELS = FSDD.parent / "labels.csv"
SPEAKERS = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")

pytestmark = pytest.mark.skipif(not WEIGHTS.is_file(), reason="real YAMNet weights not present")


# ---- an independent plain implementation of TF YAMNet's front end (features.py) ---------------
def tf_mel_matrix(num_bins=257, sample_rate=16000, num_mel=64, lo=125.0, hi=7500.0):
    """tf.signal.linear_to_mel_weight_matrix, written from its documented formula."""
    def mel(f):
        return 1127.0 * np.log(1.0 + np.asarray(f, dtype=np.float64) / 700.0)

    freqs = np.linspace(0.0, sample_rate / 2.0, num_bins)[1:]  # the DC bin is excluded
    spec_mel = mel(freqs)[:, None]
    edges = np.linspace(mel(lo), mel(hi), num_mel + 2)
    lower, center, upper = edges[None, :-2], edges[None, 1:-1], edges[None, 2:]
    weights = np.maximum(0.0, np.minimum((spec_mel - lower) / (center - lower),
                                         (upper - spec_mel) / (upper - center)))
    return np.vstack([np.zeros((1, num_mel)), weights])  # [257, 64], row 0 (DC) zero


def tf_yamnet_patches(wave: np.ndarray) -> np.ndarray:
    """pad_waveform + waveform_to_log_mel_spectrogram_patches, one clip, float64: [P, 96, 64]."""
    x = np.asarray(wave, dtype=np.float64)
    min_samples = int(round((0.96 + 0.025 - 0.010) * 16000))  # 15600
    hop = int(round(0.48 * 16000))  # 7680
    n = max(len(x), min_samples)
    n_hops = int(np.ceil((n - min_samples) / hop))
    x = np.concatenate([x, np.zeros(min_samples + n_hops * hop - len(x))])
    frames = 1 + (len(x) - 400) // 160  # tf.signal.stft, pad_end=False
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(400) / 400)  # periodic Hann
    spec = np.empty((frames, 257))
    for t in range(frames):
        spec[t] = np.abs(np.fft.rfft(x[t * 160: t * 160 + 400] * window, n=512))
    log_mel = np.log(spec @ tf_mel_matrix() + 0.001)
    count = 1 + (frames - 96) // 48  # tf.signal.frame, no pad_end
    return np.stack([log_mel[p * 48: p * 48 + 96] for p in range(count)])


def reference_clip(net, wave16: np.ndarray, layers, baseline=False):
    """Per patch: blocks max-pooled along time to block 14's rate, flattened channel-major;
    frames of all patches joined; mean + max. Baseline: per-patch average pool of block 14."""
    patches = torch.from_numpy(tf_yamnet_patches(wave16)).float()
    frames, embeddings = [], []
    with torch.no_grad():
        for p in range(patches.shape[0]):
            x = patches[p][None, None]
            per_layer = []
            for number in range(1, 15):
                x = getattr(net, f"layer{number}")(x)
                if number in layers:
                    k = x.shape[2] // 3
                    y = F.max_pool2d(x, kernel_size=(k, 1), stride=(k, 1))
                    c, t, f = y.shape[1:]
                    per_layer.append(y[0].permute(0, 2, 1).reshape(c * f, t))
            frames.append(torch.cat(per_layer))
            embeddings.append(x.mean(dim=(2, 3))[0])
    joined = torch.cat(frames, dim=1)
    fused = (joined.mean(1) + joined.max(1).values).numpy()
    emb = torch.stack(embeddings, dim=1)
    return fused, (emb.mean(1) + emb.max(1).values).numpy()


def relative_error(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def to16k(wave, rate) -> np.ndarray:
    x = torch.from_numpy(np.asarray(wave, dtype=np.float32))
    return (x if rate == 16000 else __import__("torchaudio").functional.resample(x, rate, 16000)).numpy()


@pytest.fixture(scope="module")
def yamnet():
    from fusefeat.backbones import create

    return create("yamnet", weights=str(WEIGHTS)).eval()


@pytest.fixture(scope="module")
def class_names():
    with open(YAMNET_DIR / "yamnet_class_map.csv", newline="") as handle:
        return [row["display_name"] for row in csv.DictReader(handle)]


def batch_of(waves):
    from fusefeat.backbones.base import SegmentBatch

    width = max(len(w) for w in waves)
    wave = torch.zeros(len(waves), width)
    for i, w in enumerate(waves):
        wave[i, : len(w)] = torch.from_numpy(np.asarray(w, dtype=np.float32))
    return SegmentBatch(wave, torch.tensor([len(w) for w in waves]))


# ---- the layer table ------------------------------------------------------------------------
def test_layers_lists_the_14_blocks():
    import json

    result = run_cli("layers", "--model", "yamnet", "--json", check=0)
    data = json.loads(result.stdout)
    rows = data["layers"]
    assert [r["number"] for r in rows] == list(range(1, 15))
    assert [r["module"] for r in rows] == [f"layer{n}" for n in range(1, 15)]
    assert rows[0]["shape_1s"] == [32, 48, 32] and rows[0]["frame_dim"] == 1024
    assert rows[13]["shape_1s"] == [1024, 3, 2] and rows[13]["stride_ms"] == 320
    assert all(r["frame_dim"] == 2048 for r in rows[1:])
    assert data["default"][-1] == 14 and len(data["default"]) == 2
    text = run_cli("layers", "--model", "yamnet", check=0).stdout
    assert "layer14" in text and "default fusion" in text


def test_official_padding_lengths():
    from fusefeat.backbones.yamnet import official_padded_length

    lengths = [0, 1, 15599, 15600, 15601, 23280, 23281, 16000 * 10]
    expected = [15600, 15600, 15600, 15600, 23280, 23280, 30960, 15600 + 19 * 7680]
    assert [official_padded_length(n, 15600, 7680) for n in lengths] == expected
    assert official_padded_length(torch.tensor(lengths), 15600, 7680).tolist() == expected


# ---- the front end --------------------------------------------------------------------------
def test_front_end_equals_plain_tf_recipe(yamnet):
    """Ragged rows in one batch (a 0.3 s clip padded to one patch, exact patch boundaries, 8 kHz
    speech resampled, 4 s notes): every patch equals the plain float64 TF recipe to 2e-6 (log
    domain), the float32 rounding of the result."""
    notes = sorted(NSYNTH.iterdir())
    waves = [read_wave(notes[0])[0], read_wave(notes[1])[0][:4800], read_wave(notes[2])[0][:15600],
             read_wave(notes[3])[0][:15601], read_wave(notes[4])[0][:23280 + 4321],
             to16k(*read_wave(FSDD / "4_lucas_3.wav")), to16k(*read_wave(FSDD / "8_theo_41.wav"))]
    with torch.inference_mode():
        patches, owner = yamnet.featurize(batch_of(waves))
    assert patches.shape[1:] == (1, 96, 64)
    worst = 0.0
    for i, w in enumerate(waves):
        expected = tf_yamnet_patches(w)
        ours = patches[owner == i][:, 0].double().numpy()
        assert ours.shape == expected.shape, (i, ours.shape, expected.shape)
        worst = max(worst, float(np.abs(ours - expected).max()))
    assert [int((owner == i).sum()) for i in range(3)] == [8, 1, 1]
    assert worst <= 2e-6, worst


def test_mel_matrix_is_tensorflows(yamnet):
    from fusefeat import frontends

    ours = frontends.mel_matrix(257, 16000, 64, 125.0, 7500.0, dtype=torch.float64).numpy()
    np.testing.assert_allclose(ours, tf_mel_matrix(), atol=1e-12)


# ---- real weights: the classifier hears speech ------------------------------------------------
def test_classifier_top_class_is_speech_on_fsdd(yamnet, class_names):
    """Every 50th FSDD clip (60 clips, all speakers): YAMNet's clip score (sigmoid scores
    averaged over patches) puts "Speech" first on at least 57 (measured: all 60). Over all 3000
    clips: 2965 (98.8%); 31 "Silence" (very quiet or short clips, whose zero-padded patches
    weigh in), 4 others."""
    names = sorted(p.name for p in FSDD.iterdir())[::50]
    waves = [to16k(*read_wave(FSDD / n)) for n in names]
    with torch.inference_mode():
        features = yamnet.featurize(batch_of(waves))
        embedding, logits = yamnet.classify(features)
        taps = yamnet.forward_taps(features, (14,), True, None)
    owner = features[1]
    tops = []
    for i in range(len(names)):
        scores = torch.sigmoid(logits[owner == i]).mean(0)
        tops.append(class_names[int(scores.argmax())])
    assert len(tops) == 60 and tops.count("Speech") >= 57, tops
    assert set(tops) <= {"Speech", "Silence"}, tops
    # the baseline tap is the package's own embedding, patch by patch
    torch.testing.assert_close(taps["baseline"].frames[:, :, 0], embedding, rtol=1e-5, atol=1e-6)


# ---- through the CLI ----------------------------------------------------------------------
def test_cli_vectors_equal_per_clip_reference(tmp_path, wav_dir):
    """Default pair and baseline, real weights, mixed rates and lengths, ragged batches."""
    import fusefeat
    from fusefeat.backbones.yamnet import YAMNet

    out = tmp_path / "out"
    result = run_cli("extract", wav_dir, "--model", "yamnet", "--weights", WEIGHTS, "--out", out,
                     "--baseline", "--save-layers", "--batch-size", "3", check=0)
    summary = summary_of(result)
    feats = fusefeat.load(out)
    default = summary["layers"]
    assert len(default) == 2 and default[-1] == 14
    assert summary["dim"] == 4096
    embeddings, baseline = np.asarray(feats.embeddings), np.asarray(feats.baseline)
    assert embeddings.shape == (5, 4096) and baseline.shape == (5, 1024)
    np.testing.assert_array_equal(
        embeddings, np.concatenate([np.asarray(feats.layers[n]) for n in default], axis=1))
    net = YAMNet.network()
    net.load_state_dict(torch.load(WEIGHTS, map_location="cpu"))
    net.eval()
    for i, key in enumerate(feats.paths):
        wave = to16k(*read_wave(wav_dir / key))
        expected, expected_base = reference_clip(net, wave, default)
        # float32 noise through 27 convolutions run as one batch vs one patch at a time: the
        # measured worst is about 1.2e-5; 1e-4 as in test_backbones_exact
        assert relative_error(embeddings[i], expected) <= 1e-4, key
        assert relative_error(baseline[i], expected_base) <= 1e-4, key


def test_long_clip_windows_equal_one_pass(tmp_path):
    """A 70.3 s clip at 8 kHz (speech, resampled) cut into 9.6 s windows equals one pass."""
    names = sorted(p.name for p in FSDD.iterdir())[::37]
    speech = np.concatenate([read_wave(FSDD / n)[0] for n in names])
    seconds = 70.3
    reps = int(np.ceil(seconds * 8000 / len(speech)))
    clip = np.tile(speech, reps)[: int(seconds * 8000)]
    src = tmp_path / "in"
    src.mkdir()
    sf.write(src / "long.wav", clip, 8000, subtype="FLOAT")
    from fusefeat.backbones.yamnet import YAMNet
    from fusefeat.config import load_preset
    from fusefeat.windows import Geometry, plan

    backbone = YAMNet.build(load_preset("yamnet"), random_init=True)
    geometry = Geometry(16000, 20 * 7680, backbone.window_align, backbone.context_samples,
                        backbone.lookahead_samples, backbone.min_samples)
    assert len(plan(len(clip), 8000, geometry)) == 7  # --window-seconds 10: 7 windows of 9.6 s
    outs = {}
    for label, window in (("windows", "10"), ("one", "100")):
        out = tmp_path / label
        run_cli("extract", src, "--model", "yamnet", "--weights", WEIGHTS, "--out", out,
                "--layers", "1,6,14", "--save-layers", "--baseline", "--window-seconds", window,
                "--batch-size", "4", check=0)
        import fusefeat

        outs[label] = fusefeat.load(out)
    a, b = outs["windows"], outs["one"]
    assert relative_error(np.asarray(a.embeddings), np.asarray(b.embeddings)) <= 1e-5
    assert relative_error(np.asarray(a.baseline), np.asarray(b.baseline)) <= 1e-5
    for n in (1, 6, 14):
        assert relative_error(np.asarray(a.layers[n]), np.asarray(b.layers[n])) <= 1e-5, n


def test_hub_cache_and_offline_errors(tmp_path):
    """No --weights: the torch hub cache is used; offline with nothing cached: a fast clear error."""
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(FSDD / "0_george_0.wav", src)
    empty = tmp_path / "empty_torch_home"
    offline = {"TORCH_HOME": str(empty), "HTTPS_PROXY": "http://127.0.0.1:9",
               "https_proxy": "http://127.0.0.1:9", "NO_PROXY": "", "no_proxy": ""}
    started = time.monotonic()
    result = run_cli("extract", src, "--model", "yamnet", "--out", tmp_path / "o1", env=offline)
    assert result.returncode == 1, result.stderr
    assert time.monotonic() - started < 60
    assert "https://github.com/w-hc/torch_audioset/releases/download/v0.1/yamnet.pth" in result.stderr
    assert "--weights" in result.stderr and "Traceback" not in result.stderr

    home = tmp_path / "torch_home"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    os.symlink(WEIGHTS, home / "hub" / "checkpoints" / "yamnet.pth")
    result = run_cli("extract", src, "--model", "yamnet", "--out", tmp_path / "o2",
                     env={**offline, "TORCH_HOME": str(home)}, check=0)
    assert summary_of(result)["extracted"] == 1


def test_wrong_checkpoint_is_a_clear_error(tmp_path, random_checkpoints):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(FSDD / "0_george_0.wav", src)
    result = run_cli("extract", src, "--model", "yamnet", "--weights", random_checkpoints("vggish"),
                     "--out", tmp_path / "o")
    assert result.returncode == 1
    assert "is not a yamnet checkpoint" in result.stderr and "Traceback" not in result.stderr


# ---- the paper's effect, small, through `fusefeat probe` ----------------------------------------
def test_probe_fusion_beats_embedding_on_speaker_id(tmp_path):
    """Speaker identification (6 speakers) on 300 FSDD clips (utterances 0-4 of every digit and
    speaker), `fusefeat probe --group-column index --folds 5`: each fold tests one utterance
    index and trains on the other four; 3 seeds. Measured: default fusion 98.8 % vs the 1024-d
    embedding 83.3 % (+15.4 points; with --sweep, block 6 alone 99.7 %, block 14 85.4 %).
    Asserted: the fusion ahead by at least 10 points. All 3000 clips: docs/yamnet.md."""
    import json

    src = tmp_path / "fsdd"
    src.mkdir()
    with open(LABELS, newline="") as handle:
        reader = csv.DictReader(handle)
        columns, rows = reader.fieldnames, [r for r in reader if int(r["index"]) < 5]
    for r in rows:
        os.symlink(FSDD.parent / r["filename"], src / os.path.basename(r["filename"]))
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "out"
    run_cli("extract", src, "--model", "yamnet", "--weights", WEIGHTS, "--out", out,
            "--save-layers", "--baseline", "--batch-size", "64", check=0)
    report = tmp_path / "probe.json"
    run_cli("probe", out, "--labels", labels, "--label-column", "speaker", "--group-column",
            "index", "--folds", "5", "--seeds", "3", "--combine", "6+14", "--baseline",
            "--json-out", report, cwd=tmp_path, check=0)
    result = json.loads(report.read_text())
    assert result["data"]["matched"] == 300 and result["data"]["groups"] == 5
    accuracy = {r["name"]: r["mean"] for r in result["results"]}
    assert set(accuracy) == {"fusion 6+14", "baseline"}, accuracy
    assert accuracy["fusion 6+14"] - accuracy["baseline"] >= 0.10, accuracy
