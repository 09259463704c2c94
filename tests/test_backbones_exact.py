"""fusefeat's vectors equal an independent per-clip computation of the paper's recipe
(relative error <= 1e-4 per vector), for each backbone, through the real CLI."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import soundfile as sf

import reference as ref
from conftest import FSDD, NSYNTH, read_wave, run_cli, summary_of

TOL = 1e-4


@pytest.fixture
def mixed_dir(tmp_path):
    """8 kHz speech (resampled by fusefeat), 16 kHz notes, one 44.1 kHz stereo file."""
    root = tmp_path / "in"
    root.mkdir()
    for name in ("1_nicolas_7.wav", "5_yweweler_20.wav", "9_lucas_1.wav"):
        shutil.copy(FSDD / name, root / name)
    for name in sorted(p.name for p in NSYNTH.iterdir())[3:5]:
        shutil.copy(NSYNTH / name, root / name)
    note, rate = read_wave(NSYNTH / sorted(p.name for p in NSYNTH.iterdir())[7])
    import torchaudio
    import torch

    up = torchaudio.functional.resample(torch.from_numpy(note), rate, 44100).numpy()
    stereo = np.stack([up, 0.5 * up[::-1]], axis=1)
    sf.write(root / "stereo44k.flac", stereo, 44100)
    return root


def _mono16(path):
    wave, rate = read_wave(path)
    return ref.to_16k(wave, rate)


def test_cnn14_matches_reference(tmp_path, mixed_dir, random_checkpoints):
    weights = random_checkpoints("cnn14")
    out = tmp_path / "out"
    result = run_cli("extract", mixed_dir, "--model", "cnn14", "--weights", weights, "--out", out,
                     "--baseline", "--batch-size", "4", check=0)
    assert summary_of(result)["dim"] == 6144
    import fusefeat

    feats = fusefeat.load(out)
    net = ref.cnn14_load(weights)
    embeddings, baseline = np.asarray(feats.embeddings), np.asarray(feats.baseline)
    for i, key in enumerate(feats.paths):
        wave = _mono16(mixed_dir / key)
        if wave.shape[0] < 4960:  # fusefeat pads clips below CNN14's minimum; so does the reference
            wave = np.pad(wave.numpy(), (0, 4960 - wave.shape[0]))
            import torch
            wave = torch.from_numpy(wave)
        expected, expected_base = ref.cnn14_clip(net, wave, baseline=True)
        assert embeddings[i].shape == (6144,)
        assert ref.relative_error(embeddings[i], expected) <= TOL, key
        assert ref.relative_error(baseline[i], expected_base) <= TOL, key


def test_vggish_matches_official_code(tmp_path, mixed_dir, random_checkpoints):
    weights = random_checkpoints("vggish")
    out = tmp_path / "out"
    run_cli("extract", mixed_dir, "--model", "vggish", "--weights", weights, "--out", out,
            "--batch-size", "3", "--baseline", check=0)
    import fusefeat

    feats = fusefeat.load(out)
    net = ref.vggish_load(weights)
    embeddings = np.asarray(feats.embeddings)
    assert embeddings.shape == (6, 8192)
    checked = 0
    for i, key in enumerate(feats.paths):
        wave = _mono16(mixed_dir / key).numpy()
        if wave.shape[0] < 15600:
            wave = np.pad(wave, (0, 15600 - wave.shape[0]))  # fusefeat's documented padding
            assert feats.flags[i] & 1, "short clips are flagged as padded"
        examples = ref.vggish_examples(wave)  # the official numpy front end
        expected = ref.vggish_clip(net, examples)
        assert ref.relative_error(embeddings[i], expected) <= TOL, key
        # the baseline: the 128-d output (layer 22), mean + max over examples
        expected_base = ref.vggish_clip(net, examples, layers=(22,))
        assert ref.relative_error(feats.baseline[i], expected_base) <= TOL, key
        checked += 1
    assert checked == 6


def test_vggish_front_end_equals_vggish_input(random_checkpoints):
    """The batched torch log-mel equals torchvggish.vggish_input on real 16 kHz audio."""
    import torch

    from fusefeat.backbones.base import SegmentBatch
    from fusefeat.backbones.vggish import VGGish
    from fusefeat.config import load_preset

    backbone = VGGish.build(load_preset("vggish"), random_init=True)
    names = sorted(p.name for p in NSYNTH.iterdir())[:6]
    waves = [read_wave(NSYNTH / n)[0] for n in names]
    waves[1] = waves[1][: 16000 * 2 + 1234]  # ragged lengths in one batch
    width = max(w.shape[0] for w in waves)
    batch = torch.zeros(len(waves), width)
    for i, w in enumerate(waves):
        batch[i, : w.shape[0]] = torch.from_numpy(w)
    examples, owner = backbone.featurize(SegmentBatch(batch, torch.tensor([w.shape[0] for w in waves])))
    worst = 0.0
    for i, w in enumerate(waves):
        official = ref.vggish_examples(w)
        ours = examples[owner == i]
        assert ours.shape == official.shape
        worst = max(worst, float((ours - official).abs().max()))
    assert worst <= 1e-5, worst


def test_ast_matches_official_procedure(tmp_path, mixed_dir, random_checkpoints):
    """Includes a 12 s clip: positions interpolated beyond the 10.24 s grid."""
    weights = random_checkpoints("ast")
    long_note = np.concatenate([read_wave(p)[0] for p in sorted(NSYNTH.iterdir())[10:13]])
    sf.write(mixed_dir / "long12s.wav", long_note, 16000)
    out = tmp_path / "out"
    result = run_cli("extract", mixed_dir, "--model", "ast", "--weights", weights, "--out", out,
                     check=0)
    summary = summary_of(result)
    import fusefeat
    from transformers import ASTModel

    feats = fusefeat.load(out)
    model = ASTModel.from_pretrained(weights).eval()
    width = model.config.hidden_size
    assert summary["dim"] == 2 * width
    embeddings = np.asarray(feats.embeddings)
    for i, key in enumerate(feats.paths):
        expected = ref.ast_clip(model, _mono16(mixed_dir / key))
        assert ref.relative_error(embeddings[i], expected) <= TOL, key


def test_batch_invariance_with_resampled_clips_of_different_lengths(tmp_path, random_checkpoints):
    """8 kHz clips of different lengths, zero-padded to 1 s after resampling: in one batch or one
    at a time, the same vectors (the padding of longer rows must not leak into shorter ones)."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in sorted(p.name for p in FSDD.iterdir())[:6]:
        shutil.copy(FSDD / name, inputs / name)
    weights = random_checkpoints("ast")
    for size in (1, 6):
        run_cli("extract", inputs, "-m", "ast", "-w", weights, "-o", tmp_path / f"b{size}",
                "--clip-seconds", "1", "-b", str(size), check=0)
    import fusefeat

    one, all_ = (np.asarray(fusefeat.load(tmp_path / f"b{s}").embeddings) for s in (1, 6))
    worst = max(ref.relative_error(all_[i], one[i]) for i in range(len(one)))
    assert worst <= 1e-5, worst
