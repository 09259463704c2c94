"""`fusefeat probe`: the paper's linear evaluation. Splits and the classifier on synthetic data;
label matching and reporting through the real CLI; and the probe learning on real Whisper-base
features of a small FSDD subset (thresholds from measurements, see docs/hf-probe.md)."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from conftest import FSDD, MODELS, run_cli, summary_of
from fusefeat.probe import (Matched, ProbeSettings, evaluate, group_folds, splits_for,
                            stratified_folds)

WHISPER = MODELS / "whisper-base-encoder"
SPEAKERS = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")


def _synthetic(n=240, dim=256, classes=4, seed=0, groups=6):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centres = rng.normal(size=(classes, dim)) * 0.6
    x = (centres[labels] + rng.normal(size=(n, dim))).astype(np.float32)
    g = rng.integers(0, groups, n)
    return x, Matched(np.arange(n), labels, [f"c{i}" for i in range(classes)], g, {},
                      [f"g{i}" for i in range(groups)])


def test_linear_probe_learns_separable_data_deterministically():
    x, data = _synthetic()
    data.groups = None
    settings = ProbeSettings(folds=4, seeds=2)
    first = evaluate(x, data, settings)
    assert first.mean > 0.9, first
    assert len(first.accuracies) == 2 and len(first.accuracies[0]) == 4
    again = evaluate(x, data, settings)
    assert again.accuracies == first.accuracies  # seeded: same splits, init and batch order
    noise = evaluate(np.random.default_rng(1).normal(size=x.shape).astype(np.float32), data,
                     ProbeSettings(folds=4, seeds=1))
    assert noise.mean < 0.45  # chance is 0.25: nothing to learn


def test_group_folds_keep_every_group_on_one_side():
    _, data = _synthetic(n=300, groups=7)
    everything = np.arange(len(data.labels))
    for seed in range(3):
        for folds in (3, 7):
            tests = group_folds(data.groups, folds, seed)
            assert len(tests) == folds
            assert np.array_equal(np.sort(np.concatenate(tests)), everything)  # a partition
            for test in tests:
                train = np.setdiff1d(everything, test)
                assert not set(data.groups[test]) & set(data.groups[train])
    data_settings = ProbeSettings(folds=10)  # more folds than groups: one group per fold
    assert len(splits_for(data, data_settings, 0)) == 7


def test_stratified_folds_partition_and_balance():
    labels = np.repeat(np.arange(5), [20, 20, 20, 13, 7])
    tests = stratified_folds(labels, 4, seed=3)
    assert np.array_equal(np.sort(np.concatenate(tests)), np.arange(len(labels)))
    for c, size in enumerate([20, 20, 20, 13, 7]):
        counts = [int((labels[t] == c).sum()) for t in tests]
        assert max(counts) - min(counts) <= 1 and sum(counts) == size


# ---- real Whisper-base features of a small FSDD subset ------------------------------------------

def _subset():
    """6 speakers x 5 clips: digits 0-4, utterance index = the speaker's number (0-5)."""
    return [f"{digit}_{speaker}_{s}.wav" for s, speaker in enumerate(SPEAKERS)
            for digit in range(5)]


@pytest.fixture(scope="module")
def whisper_features(tmp_path_factory):
    """Real Whisper-base features (all 7 layers stored) of 30 FSDD clips, and labels.csv."""
    root = tmp_path_factory.mktemp("probe")
    wavs = root / "data" / "wav"
    wavs.mkdir(parents=True)
    names = _subset()
    for name in names:
        shutil.copy(FSDD / name, wavs / name)
    out = root / "feats"
    summary = summary_of(run_cli("extract", root / "data", "--model", f"hf:{WHISPER}",
                                 "--layers", "all", "--save-layers", "--out", out,
                                 "--num-workers", "0", check=0))
    assert summary["extracted"] == 30
    return out, names


def _write_labels(path, rows, columns=("filename", "label", "speaker")):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)


def test_probe_learns_speakers_from_real_whisper_layers(whisper_features, tmp_path):
    """Speaker identification on 30 clips (chance 1/6): the middle block knows the speaker,
    the last block has mostly lost it (the paper's finding). Measured on this subset with the
    600-clip run's features (docs/hf-probe.md): layer 3 78%, layer 6 20%, fusion 3+6 48%."""
    feats, names = whisper_features
    labels = tmp_path / "labels.csv"
    _write_labels(labels, [(f"wav/{n}", n.split("_")[0], n.split("_")[1]) for n in names])
    out = tmp_path / "speaker.json"
    result = run_cli("probe", feats, "--labels", labels, "--label-column", "speaker",
                     "--folds", "5", "--seeds", "2", "--layer", "3", "--layer", "6",
                     "--combine", "3+6", "--json-out", out, check=0)
    report = json.loads(out.read_text())
    acc = {r["name"]: r["mean"] for r in report["results"]}
    assert set(acc) == {"layer 3", "layer 6", "fusion 3+6"}
    assert report["data"]["matched"] == 30 and report["data"]["classes"] == 6
    assert acc["layer 3"] >= 0.6, result.stdout
    assert acc["layer 3"] - acc["layer 6"] >= 0.3, result.stdout
    assert acc["fusion 3+6"] >= 0.3, result.stdout
    assert "fusion 3+6" in result.stdout and "±" in result.stdout


def test_probe_reports_matching_groups_and_sweep_chart(whisper_features, tmp_path):
    """Paths match by suffix; rows without a label are skipped and counted; labels without
    features are reported; groups stay on one side; --sweep probes every stored layer and the
    fusion and draws the chart."""
    feats, names = whisper_features
    rows = [(f"fsdd/wav/{n}", n.split("_")[0], n.split("_")[1]) for n in names]
    rows += [("fsdd/wav/0_george_49.wav", "", "george"), ("fsdd/wav/1_george_48.wav", "", "george")]
    rows += [("fsdd/wav/missing_1.wav", "1", "theo"), ("fsdd/wav/missing_2.wav", "2", "theo"),
             ("fsdd/wav/missing_3.wav", "3", "lucas")]
    labels = tmp_path / "labels.csv"
    _write_labels(labels, rows)
    result = run_cli("probe", feats, "--labels", labels, "--group-column", "speaker",
                     "--folds", "3", "--seeds", "1", "--epochs", "30", "--sweep",
                     "--json-out", tmp_path / "digits.json", "--chart", tmp_path / "digits.png",
                     "--task", "digits, speakers apart", check=0)
    out = result.stdout
    assert "30 labelled clips, 5 classes, 6 groups by speaker" in out
    assert "2 row(s) of the labels file have no label: skipped" in out
    assert "3 labelled path(s) have no features" in out and "missing_1.wav" in out
    report = json.loads((tmp_path / "digits.json").read_text())
    assert report["data"]["matched_by_suffix"] == 30
    names_probed = [r["name"] for r in report["results"]]
    assert names_probed == [f"layer {n}" for n in range(7)] + ["fusion 0-6"]
    folds = report["test_folds"][0]
    assert len(folds) == 3 and sorted(sum(folds, [])) == sorted(SPEAKERS)  # each speaker once
    import matplotlib.image

    image = matplotlib.image.imread(tmp_path / "digits.png")
    assert image.shape[0] > 300 and image.shape[1] > 600


def test_probe_usage_errors(whisper_features, tmp_path):
    feats, names = whisper_features
    labels = tmp_path / "labels.csv"
    _write_labels(labels, [(f"other/{n}.flac", "1", "x") for n in names])
    result = run_cli("probe", feats, "--labels", labels)
    assert result.returncode == 2 and "matches a file in the features" in result.stderr
    result = run_cli("probe", feats, "--labels", labels, "--label-column", "digit")
    assert result.returncode == 2 and "no such column" in result.stderr
