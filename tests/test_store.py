"""Resume details: changed files, merge refusing mixed settings, the library API in-process."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import soundfile as sf

from conftest import NSYNTH, run_cli, summary_of

import fusefeat


@pytest.fixture
def small(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    for path in sorted(NSYNTH.iterdir())[:3]:
        shutil.copy(path, root / path.name)
    return root


def test_changed_files_are_reported_and_refreshed_on_request(tmp_path, small, random_checkpoints):
    weights = random_checkpoints("vggish")
    out = tmp_path / "out"
    run_cli("extract", small, "-m", "vggish", "-w", weights, "-o", out, check=0)
    before = fusefeat.load(out)
    changed = sorted(small.iterdir())[1]
    wave, rate = sf.read(changed, dtype="float32")
    sf.write(changed, wave[::-1].copy(), rate)  # same length, other content, new mtime
    os.utime(changed, ns=(os.stat(changed).st_atime_ns, os.stat(changed).st_mtime_ns + 10**9))
    report = json.loads(run_cli("info", out, "--json", check=0).stdout)
    assert report["changed"] == [changed.name]
    plain = summary_of(run_cli("extract", small, "-m", "vggish", "-w", weights, "-o", out, check=0))
    assert plain["extracted"] == 0  # without the flag nothing is redone
    refreshed = run_cli("extract", small, "-m", "vggish", "-w", weights, "-o", out,
                        "--refresh-changed", check=0)
    assert summary_of(refreshed)["extracted"] == 1 and "changed" in refreshed.stderr
    after = fusefeat.load(out)
    assert after.paths == before.paths  # one row per path: the newest commit wins
    i = after.paths.index(changed.name)
    assert not np.allclose(after.embeddings[i], before.embeddings[i])
    np.testing.assert_array_equal(np.delete(np.asarray(after.embeddings), i, 0),
                                  np.delete(np.asarray(before.embeddings), i, 0))
    assert json.loads(run_cli("info", out, "--json", check=0).stdout)["changed"] == []


def test_merge_refuses_shards_of_other_settings(tmp_path, small, random_checkpoints):
    weights = random_checkpoints("vggish")
    a, b = tmp_path / "a", tmp_path / "b"
    run_cli("extract", small, "-m", "vggish", "-w", weights, "-o", a, check=0)
    run_cli("extract", small, "-m", "vggish", "-w", weights, "-o", b, "--layers", "15", check=0)
    stray = next(b.glob("shard-*.h5"))
    shutil.copy(stray, a / stray.name.replace("shard-p0000", "shard-p0000").replace(".h5", "9.h5"))
    result = run_cli("merge", a, "-o", tmp_path / "m.h5")
    assert result.returncode == 1 and "different settings" in result.stderr
    assert not (tmp_path / "m.h5").exists()


def test_library_api_in_process(tmp_path, small, random_checkpoints):
    summary = fusefeat.extract([str(small)], model="vggish", weights=str(random_checkpoints("vggish")),
                               out=str(tmp_path / "lib"), num_workers=0, progress=False,
                               save_layers=True, baseline=True)
    assert summary.status == "complete" and summary.exit_code == 0 and summary.extracted == 3
    feats = fusefeat.load(tmp_path / "lib")
    assert feats.embeddings.shape == (3, 8192) and feats.baseline.shape == (3, 128)
    assert set(feats.layers) == {10, 15}
    chunks = list(feats.embeddings.chunks(2))
    assert [c.shape[0] for c in chunks] == [2, 1]
    np.testing.assert_array_equal(np.concatenate(chunks), np.asarray(feats.embeddings))
    assert feats.embeddings[[2, 0]].shape == (2, 8192)
    np.testing.assert_array_equal(feats.embeddings[-1], np.asarray(feats.embeddings)[2])
