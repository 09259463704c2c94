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


def test_cpu_front_end_blocks_give_the_values_of_one_pass(monkeypatch):
    """On the CPU the log-mel is computed a block of frames at a time (cache-sized); block
    edges, partial blocks and rows must not show in the values."""
    from fusefeat import frontends

    torch.manual_seed(0)
    wave = torch.randn(3, 16000 * 2 + 777) * 0.1
    wave[1, 5000:] = 0.0  # a row that ends early (zero padding)
    preset = load_preset("vggish")
    monkeypatch.setattr(frontends, "CPU_FRAMES_PER_BLOCK", 10**9)
    whole = frontends.htk_log_mel_float64(wave, 16000, preset.frontend)
    monkeypatch.setattr(frontends, "CPU_FRAMES_PER_BLOCK", 37)
    blocked = frontends.htk_log_mel_float64(wave, 16000, preset.frontend)
    assert blocked.shape == whole.shape == (3, 1 + (wave.shape[1] - 400) // 160, 64)
    assert torch.equal(blocked, whole)
    spectrum = torch.fft.rfft(torch.randn(4, 512, dtype=torch.float64))
    torch.testing.assert_close(frontends.complex_abs(spectrum), spectrum.abs(), rtol=1e-15, atol=0)


def test_front_end_thread_runs_torch_on_one_thread_and_leaves_the_callers():
    """The CPU front end's helper thread gets one torch thread (more only spin against the
    network); the caller's count, and the default for threads started later, stay as they were."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from fusefeat.threads import single_threaded_helper

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        initializer = single_threaded_helper()
        assert initializer is not None  # OpenMP builds: the count is per thread
        with ThreadPoolExecutor(1, initializer=initializer) as helper:
            assert helper.submit(torch.get_num_threads).result() == 1
            assert torch.get_num_threads() == 2
            seen = []
            later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
            later.start()
            later.join()
            assert seen == [2]
            # and the helper's ops really run: a front end computed there equals the caller's
            wave = torch.randn(2, 16000) * 0.1
            from fusefeat import frontends

            frontend = load_preset("vggish").frontend
            there = helper.submit(frontends.htk_log_mel_float64, wave, 16000, frontend).result()
            assert torch.equal(there, frontends.htk_log_mel_float64(wave, 16000, frontend))
    finally:
        torch.set_num_threads(before)
