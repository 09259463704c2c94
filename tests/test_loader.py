"""Decode workers: input order whatever the worker count, bounded memory, and workers that die
(killed by the OOM killer, a codec crash) cost at most the file they were reading."""

from __future__ import annotations

import os
import signal
import threading
import time

from conftest import FSDD
from fusefeat.loader import DecodePool, DecodeTask, Failed, Segment
from fusefeat.windows import Geometry

GEOMETRY = Geometry(16000, 16000 * 3 // 5120 * 5120, 5120, 8 * 5120, 0, 4960)


def _tasks(count, extra=()):
    files = [str(FSDD / n) for n in sorted(os.listdir(FSDD))[:count]] + list(extra)
    return [DecodeTask(i, f, f) for i, f in enumerate(files)]


def _order(messages):
    return [(m.file_index, m.piece.index if isinstance(m, Segment) else -1)
            for m in messages if isinstance(m, (Segment, Failed))]


def test_results_come_in_input_order_whatever_the_workers(tmp_path):
    import numpy as np
    import soundfile as sf

    long_clip = tmp_path / "long.wav"  # 10 s: cut into windows
    sf.write(long_clip, np.random.default_rng(0).standard_normal(160000).astype("float32") * 0.1,
             16000)
    tasks = _tasks(30, [str(tmp_path / "missing.wav"), str(long_clip)])
    inline = _order(DecodePool(tasks, GEOMETRY, workers=0))
    assert inline[-1][1] > 0 and (30, -1) in inline  # windows of the long clip; the missing file
    for workers in (1, 3):
        assert _order(DecodePool(tasks, GEOMETRY, workers=workers, prefetch_mb=0.5)) == inline


def test_killed_workers_cost_at_most_their_file():
    tasks = _tasks(400)
    pool = DecodePool(tasks, GEOMETRY, workers=2, prefetch_mb=0.2)
    kills = []

    def killer():
        for _ in range(6):
            time.sleep(0.6)  # long enough for a new worker to start and decode
            workers = list(pool._pool)
            if workers:
                os.kill(workers[0].proc.pid, signal.SIGKILL)
                kills.append(workers[0].proc.pid)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    done, failed = set(), {}
    for message in pool:
        if isinstance(message, Segment):
            done.add(message.file_index)
            time.sleep(0.01)  # a model's pace: the workers wait on us, as in a real run
        elif isinstance(message, Failed):
            failed[message.file_index] = message.failure
    thread.join()
    assert len(kills) >= 3
    assert done | set(failed) == set(range(400)) and not done & set(failed)
    assert len(failed) <= len(kills)
    assert all(f.error_type == "DecoderCrashed" and "died" in f.message for f in failed.values())


def test_workers_decode_while_the_consumer_is_busy():
    """While the model works on a batch nobody iterates the pool: a thread must read the
    workers' pipes meanwhile (a pipe holds 64 KiB, less than one 4 s clip), or decoding would
    only happen between batches."""
    from conftest import NSYNTH

    files = [str(p) for p in sorted(NSYNTH.iterdir())[:8]]  # 4 s at 16 kHz: 256 KB each
    tasks = [DecodeTask(i, f, f) for i, f in enumerate(files)]
    pool = DecodePool(tasks, GEOMETRY, workers=1)
    messages = iter(pool)
    first = next(m for m in messages if isinstance(m, Segment))
    time.sleep(1.5)  # "the model" runs; the pool is not iterated
    assert first.file_index == 0
    assert pool._handed.qsize() >= 6, pool._handed.qsize()  # decoded ahead, waiting for us
    rest = [m.file_index for m in messages if isinstance(m, Segment)]
    assert rest == list(range(1, 8))


def test_pcm16_reads_as_libsndfile_floats_bit_for_bit(tmp_path):
    """16-bit mono WAV is read as int16 and scaled here (faster than libsndfile's float
    conversion): the samples must be libsndfile's own, extremes and offsets included."""
    import numpy as np
    import soundfile as sf

    from fusefeat import audio

    rng = np.random.default_rng(0)
    samples = rng.integers(-32768, 32768, size=48000, dtype=np.int16)
    samples[:4] = [-32768, 32767, 0, -1]
    path = tmp_path / "pcm16.wav"
    sf.write(path, samples, 16000, subtype="PCM_16")
    expected = sf.read(path, dtype="float32")[0]
    for start, stop in ((0, 48000), (1234, 40000), (47000, 60000)):  # the last runs past the end
        ours = audio.read_mono(str(path), start, stop)
        assert ours.dtype == np.float32
        assert np.array_equal(ours, expected[start:stop])
