"""The device step: out-of-memory back-off and failure isolation (simulated on the CPU)."""

from __future__ import annotations

import torch

from conftest import FSDD
from fusefeat.backbones.vggish import VGGish
from fusefeat.config import load_preset
from fusefeat.loader import DecodeTask, decode
from fusefeat.runner import Runner
from fusefeat.windows import Geometry


def _segments(backbone, count=6):
    geometry = Geometry(16000, backbone.window_align * 60, backbone.window_align, 0,
                        backbone.lookahead_samples, backbone.min_samples)
    names = sorted(p.name for p in FSDD.iterdir())[:count]
    segments = []
    for i, name in enumerate(names):
        segments += list(decode(DecodeTask(i, name, str(FSDD / name)), geometry, None))
    return segments


def test_out_of_memory_halves_the_batch_and_loses_nothing():
    torch.manual_seed(0)
    backbone = VGGish.build(load_preset("vggish"), random_init=True)
    runner = Runner(backbone, (10, 15), False, False, torch.device("cpu"))
    segments = _segments(backbone)
    reference = runner.run(segments).stats[10].total
    real_forward = runner.forward

    def forward_with_small_memory(batch):
        if batch.wave.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(batch)

    runner.forward = forward_with_small_memory
    results, failures = runner.run_safely(segments, keys=lambda i: str(i))
    assert not failures
    assert runner.max_batch is not None and runner.max_batch <= 3
    assert sum(len(r.segments) for r in results) == len(segments)
    got = torch.cat([r.stats[10].total for r in results])
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)


def test_a_failing_clip_fails_alone():
    backbone = VGGish.build(load_preset("vggish"), random_init=True)
    runner = Runner(backbone, (10, 15), False, False, torch.device("cpu"))
    segments = _segments(backbone)
    real_forward = runner.forward

    segments[3].wave[:] = 0.0  # the clip the simulated kernel chokes on: recognisable by silence

    def only_when_present(batch):
        if bool((batch.wave.abs().sum(dim=1) == 0).any()):
            raise RuntimeError("simulated kernel failure")
        return real_forward(batch)

    runner.forward = only_when_present
    results, failures = runner.run_safely(segments, keys=lambda i: f"file{i}")
    assert [f.path for _, f in failures] == ["file3"]
    assert failures[0][1].stage == "model" and "simulated kernel failure" in failures[0][1].message
    assert sorted(s.file_index for r in results for s in r.segments) == [0, 1, 2, 4, 5]


def test_cpu_row_chunks_give_the_rows_of_one_forward():
    """On the CPU the patch models run a few rows at a time (faster there); every tap, the FC
    layers and the baseline come back as one forward over all rows would give them."""
    from fusefeat.backbones.base import BASELINE
    from fusefeat.backbones.yamnet import YAMNet

    torch.manual_seed(0)
    for backbone, taps in ((VGGish.build(load_preset("vggish"), random_init=True), (10, 18)),
                           (YAMNet.build(load_preset("yamnet"), random_init=True), (6, 14))):
        runner = Runner(backbone, taps, True, False, torch.device("cpu"))
        batch = runner.prepare(_segments(backbone, count=5))
        features = backbone.featurize(batch)
        assert features[0].shape[0] > 3  # more rows than one chunk
        results = {}
        for chunk in (None, 3):
            backbone.cpu_rows_per_forward = chunk
            with torch.inference_mode():
                results[chunk] = backbone.forward_taps(features, taps, True, batch)
        assert set(results[3]) == set(taps) | {BASELINE}
        for key, whole in results[None].items():
            torch.testing.assert_close(results[3][key].frames, whole.frames, rtol=1e-5, atol=1e-6)
            assert results[3][key].stride == whole.stride
            assert torch.equal(results[3][key].owner, whole.owner)

