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
import signal
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np

from fusefeat import audio
from fusefeat.errors import AudioError, FileFailure, FusefeatError
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
    # Ctrl-C and SLURM's SIGTERM reach the whole process group: the main process decides when
    # to stop (it commits first), workers must not die under it and look like crashed decoders.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = mp.parent_process()

    def orphaned() -> bool:  # the main process was killed (SIGKILL): do not linger
        return parent is not None and not parent.is_alive()

    while True:
        try:
            task = tasks.get(timeout=1.0)
        except queue.Empty:
            if orphaned():
                return
            continue
        if task is None:
            return
        results.put(("begin", worker_id, task.file_index))
        for message in decode(task, geometry, clip_samples):
            if isinstance(message, Segment):
                while not credits.acquire(timeout=1.0):
                    if orphaned():
                        return
            results.put(("item", worker_id, message))
        results.put(("end", worker_id, task.file_index))


class DecodePool:
    """Iterate over Segments and Failed messages for `tasks`, in task order.

    Workers decode ahead; results are handed out in the order of the tasks (then of the pieces
    within a file), so batches and vectors do not depend on which worker was faster. Each worker
    holds at most `prefetch / workers` decoded segments that wait to be handed out; the worker
    of the file being handed out never waits on another worker, so this cannot deadlock."""

    def __init__(self, tasks: Sequence[DecodeTask], geometry: Geometry,
                 clip_samples: Optional[int] = None, workers: int = 2, prefetch: int = 64):
        self.tasks = list(tasks)
        self.geometry = geometry
        self.clip_samples = clip_samples
        self.workers = workers
        self.per_worker = max(2, prefetch // max(1, workers))
        self._context = mp.get_context("spawn")  # never fork a process that holds torch threads
        self._procs: dict[int, mp.Process] = {}
        self._credits: dict[int, object] = {}
        self._idle_deaths = 0  # workers that died without a file: a broken environment

    def __iter__(self) -> Iterator:
        if self.workers <= 0:
            for task in self.tasks:
                yield from decode(task, self.geometry, self.clip_samples)
            return
        yield from self._parallel()

    def _spawn(self, worker_id: int) -> None:
        credits = self._context.Semaphore(self.per_worker)
        proc = self._context.Process(
            target=_worker_main, name=f"fusefeat-decode-{worker_id}", daemon=True,
            args=(worker_id, self._task_queue, self._results, credits, self.geometry,
                  self.clip_samples))
        proc.start()
        self._procs[worker_id] = proc
        self._credits[worker_id] = credits

    def _parallel(self) -> Iterator:
        ctx = self._context
        self._task_queue = ctx.Queue()
        self._results = ctx.Queue()
        order = [t.file_index for t in self.tasks]
        by_index = {t.file_index: t for t in self.tasks}
        buffered: dict[int, list] = {}  # file index -> (worker id, message) not yet handed out
        ended: set[int] = set()
        busy: dict[int, int] = {}  # worker id -> file index being decoded
        handed = 0  # tasks put on the queue
        position = 0  # index in `order` of the file being handed out
        next_id = 0
        for _ in range(self.workers):
            self._spawn(next_id)
            next_id += 1

        def feed() -> None:
            nonlocal handed
            while handed < len(order) and handed - position < 2 * self.workers + self.workers:
                self._task_queue.put(by_index[order[handed]])
                handed += 1

        def release(worker_id: int, message) -> None:
            credits = self._credits.get(worker_id)
            if credits is not None and isinstance(message, Segment):
                credits.release()

        try:
            feed()
            while position < len(order):
                current = order[position]
                # hand out what the current file already has, then move on if it is done
                while buffered.get(current):
                    worker_id, message = buffered[current].pop(0)
                    yield message
                    release(worker_id, message)
                if current in ended:
                    buffered.pop(current, None)
                    position += 1
                    feed()
                    continue
                try:
                    kind, worker_id, payload = self._results.get(timeout=0.5)
                except queue.Empty:
                    self._replace_dead_workers(busy, buffered, ended, by_index)
                    if self._idle_deaths > 3 * self.workers:
                        raise FusefeatError(
                            "the decoding worker processes keep dying before reading any file",
                            hint="run with --num-workers 0 to decode in the main process and "
                                 "see the error") from None
                    for _ in range(self.workers - len(self._procs)):
                        self._spawn(next_id)
                        next_id += 1
                    continue
                if kind == "begin":
                    busy[worker_id] = payload
                elif kind == "end":
                    busy.pop(worker_id, None)
                    ended.add(payload)
                else:
                    buffered.setdefault(payload.file_index, []).append((worker_id, payload))
        finally:
            self.close()

    def _replace_dead_workers(self, busy, buffered, ended, by_index) -> None:
        for worker_id, proc in list(self._procs.items()):
            if proc.is_alive():
                continue
            del self._procs[worker_id]
            self._credits.pop(worker_id, None)
            file_index = busy.pop(worker_id, None)
            if file_index is None:
                self._idle_deaths += 1
                continue
            task = by_index[file_index]
            buffered[file_index] = [(worker_id, Failed(file_index, FileFailure(
                task.key, "decode", "DecoderCrashed",
                f"the decoder process died (exit code {proc.exitcode}) while reading this file; "
                "the file is probably corrupt")))]
            ended.add(file_index)

    def close(self) -> None:
        for _ in self._procs:
            try:
                self._task_queue.put(None)
            except (OSError, ValueError, AttributeError):
                break
        for proc in self._procs.values():
            proc.join(timeout=1.0)
            if proc.is_alive():
                proc.kill()  # workers ignore SIGTERM
                proc.join(timeout=1.0)
        self._procs.clear()
