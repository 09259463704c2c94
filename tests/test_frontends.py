"""Batched front ends: equal to the reference implementations they replace."""

from __future__ import annotations

import pytest
import torch

from fusefeat import frontends
from fusefeat.config import load_preset


def test_cpu_front_end_blocks_give_the_values_of_one_pass(monkeypatch):
    """On the CPU the log-mel is computed a block of frames at a time (cache-sized); block
    edges, partial blocks and rows must not show in the values."""
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


@pytest.mark.parametrize("orig,new", [(44100, 16000), (48000, 16000), (22050, 16000),
                                      (8000, 16000), (11025, 16000), (192000, 16000),
                                      (16000, 8000), (44100, 32000)])
def test_resample_equals_torchaudio(orig, new):
    """The sinc resampler on its kernel's non-zero bands gives torchaudio's samples, lengths
    included, rows independent of the batch (padded rows, odd lengths)."""
    import torchaudio.functional as AF

    torch.manual_seed(0)
    wave = torch.randn(3, 20011) * 0.3
    wave[2, 9000:] = 0.0  # a shorter clip, zero-padded in the batch
    ours = frontends.resample(wave, orig, new)
    theirs = AF.resample(wave, orig, new)
    assert ours.shape == theirs.shape
    assert ours.shape[1] == frontends.resampled_length(wave.shape[1], orig, new)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    alone = frontends.resample(wave[1:2, :777], orig, new)
    torch.testing.assert_close(alone, AF.resample(wave[1:2, :777], orig, new), rtol=0, atol=1e-6)
