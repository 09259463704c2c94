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
