"""Decoding in worker processes, ahead of the model.

The main process hands out files; each worker probes a file, plans its segments
(fusefeat.windows) and sends them back one at a time, holding a credit per segment in flight so
that memory stays bounded (`prefetch` segments at most, whatever the files' lengths). A worker
that dies (a crash inside a codec library, say) costs only the file it was reading: that file
is reported as failed and a new worker takes over. With `workers=0` decoding runs inline.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np

from fusefeat import audio
from fusefeat.errors import AudioError, FileFailure
from fusefeat.windows import Geometry, Piece, plan


@dataclass
class Segment:
    """Decoded samples of one piece of one clip (source rate, mono float32)."""

    file_index: int
    piece: Piece
    wave: np.ndarray
    sample_rate: int
    info: audio.AudioInfo
    flags: int


@dataclass
class Failed:
    file_index: int
    failure: FileFailure


@dataclass(frozen=True)
class DecodeTask:
    file_index: int
    key: str
    source: str


def decode(task: DecodeTask, geometry: Geometry, clip_samples: Optional[int]) -> Iterator:
    """Yield the Segments of one file, or one Failed."""
    try:
        info = audio.probe(task.source)
        pieces = plan(info.frames, info.sample_rate, geometry, clip_samples)
        flags = audio.FLAG_TRUNCATED if info.truncated else 0
        for piece in pieces:
            wave = audio.read_mono(task.source, piece.read_start, piece.read_stop)
            if piece.count == 1 and piece.padded_length > piece.length:
                flags |= audio.FLAG_PADDED
            if piece.count == 1 and clip_samples is None and wave.size < piece.read_stop - piece.read_start:
                flags |= audio.FLAG_TRUNCATED
            yield Segment(task.file_index, piece, wave, info.sample_rate, info,
                          flags | audio.content_flags(wave))
    except AudioError as exc:
        yield Failed(task.file_index, FileFailure.from_exception(task.key, "decode", exc))
    except MemoryError:
        yield Failed(task.file_index, FileFailure(task.key, "decode", "MemoryError",
                                                  "out of memory while decoding this file"))


def _worker_main(worker_id, tasks, results, credits, geometry, clip_samples):
    while True:
        task = tasks.get()
        if task is None:
            return
        results.put(("begin", worker_id, task.file_index))
        for message in decode(task, geometry, clip_samples):
            if isinstance(message, Segment):
                credits.acquire()
            results.put(("item", worker_id, message))
        results.put(("end", worker_id, task.file_index))


class DecodePool:
    """Iterate over Segments and Failed messages for `tasks` (in no particular order).

    At most `prefetch` decoded segments wait between the workers and the consumer."""

    def __init__(self, tasks: Sequence[DecodeTask], geometry: Geometry,
                 clip_samples: Optional[int] = None, workers: int = 2, prefetch: int = 64):
        self.tasks = list(tasks)
        self.geometry = geometry
        self.clip_samples = clip_samples
        self.workers = workers
        self.prefetch = max(1, prefetch)
        self._context = mp.get_context("spawn")  # never fork a process that holds torch threads
        self._credits = None
        self._procs: dict[int, mp.Process] = {}

    def __iter__(self) -> Iterator:
        if self.workers <= 0:
            for task in self.tasks:
                yield from decode(task, self.geometry, self.clip_samples)
            return
        yield from self._parallel()

    def _spawn(self, worker_id: int) -> None:
        proc = self._context.Process(
            target=_worker_main, name=f"fusefeat-decode-{worker_id}", daemon=True,
            args=(worker_id, self._task_queue, self._results, self._credits, self.geometry,
                  self.clip_samples))
        proc.start()
        self._procs[worker_id] = proc

    def _parallel(self) -> Iterator:
        ctx = self._context
        self._task_queue = ctx.Queue()
        self._results = ctx.Queue()
        self._credits = ctx.Semaphore(self.prefetch)
        by_index = {t.file_index: t for t in self.tasks}
        pending = iter(self.tasks)
        outstanding = 0  # tasks handed out and not yet ended
        busy: dict[int, int] = {}  # worker id -> file index being decoded
        next_id = 0
        for _ in range(self.workers):
            self._spawn(next_id)
            next_id += 1

        def feed() -> None:
            nonlocal outstanding
            while outstanding < 2 * self.workers:
                task = next(pending, None)
                if task is None:
                    return
                self._task_queue.put(task)
                outstanding += 1

        try:
            feed()
            while outstanding:
                try:
                    kind, worker_id, payload = self._results.get(timeout=0.5)
                except queue.Empty:
                    for wid, proc in list(self._procs.items()):
                        if proc.is_alive():
                            continue
                        del self._procs[wid]
                        file_index = busy.pop(wid, None)
                        if file_index is not None:
                            outstanding -= 1
                            task = by_index[file_index]
                            yield Failed(file_index, FileFailure(
                                task.key, "decode", "DecoderCrashed",
                                f"the decoder process died (exit code {proc.exitcode}) while "
                                "reading this file; the file is probably corrupt"))
                            self._credits.release()  # the dead worker may have held one
                        self._spawn(next_id)
                        next_id += 1
                    feed()
                    continue
                if kind == "begin":
                    busy[worker_id] = payload
                elif kind == "end":
                    busy.pop(worker_id, None)
                    outstanding -= 1
                    feed()
                else:
                    yield payload
                    if isinstance(payload, Segment):  # consumed: the worker may decode another
                        self._credits.release()
        finally:
            self.close()

    def close(self) -> None:
        for _ in self._procs:
            try:
                self._task_queue.put(None)
            except (OSError, ValueError):
                break
        for proc in self._procs.values():
            proc.join(timeout=1.0)
            if proc.is_alive():
                proc.terminate()
        self._procs.clear()
