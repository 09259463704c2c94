"""Decoding in worker processes, ahead of the model.

The main process hands out files; each worker probes a file, plans its segments
(fusefeat.windows) and sends them back one at a time through its own pipe. Results are handed
on in input order, so batches (and vectors) never depend on which worker was faster. A thread of
the main process reads the pipes while the model runs (a pipe holds 64 KiB: without it, workers
would wait for the model to finish each batch); samples cross the pipe as raw bytes after a
small header, and the processes can be started before the model loads (WarmWorkers). Memory
stays bounded whatever the files' lengths: at most `prefetch_mb` of decoded audio waits, half
of it handed out by the reading thread, half in its reorder buffer, where it stops reading a
worker's pipe once its share waits; the worker then blocks on its next send.

Each worker has its own pipe, so no lock is shared: a worker that dies (a crash inside a codec
library, the OOM killer) costs only the file it was reading, which is reported as failed, and a
new worker takes over its queue. With `workers=0` decoding runs inline.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import signal
import threading
from multiprocessing.connection import wait
from dataclasses import dataclass, replace
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


@dataclass(frozen=True)
class _SamplesFollow:
    """Stands for a Segment's samples, sent next as raw bytes: pickling 1.8 MB of samples
    (10 s at 44.1 kHz) and unpickling them cost twice the CPU of the raw transfer."""

    count: int


def _send(conn, message) -> None:
    if not isinstance(message, Segment):
        conn.send(message)
        return
    wave = np.ascontiguousarray(message.wave, dtype=np.float32)
    conn.send(replace(message, wave=_SamplesFollow(wave.size)))
    if wave.size:
        conn.send_bytes(memoryview(wave).cast("B"))


def _recv(conn):
    """The next message of a worker, samples included (EOFError/OSError if it is gone)."""
    message = conn.recv()
    if isinstance(message, Segment) and isinstance(message.wave, _SamplesFollow):
        wave = np.empty(message.wave.count, dtype=np.float32)
        if wave.size:
            conn.recv_bytes_into(memoryview(wave).cast("B"))
        message.wave = wave
    return message


def _worker_main(conn):
    """A decoding process: ("setup", geometry, clip_samples) first, then tasks; None ends it."""
    # Ctrl-C and SLURM's SIGTERM reach the whole process group: the main process decides when
    # to stop (it commits first), workers must not die under it and look like crashed decoders.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = mp.parent_process()
    geometry = clip_samples = None
    try:
        while True:
            if not conn.poll(1.0):
                if parent is not None and not parent.is_alive():
                    return  # the main process was killed: do not linger
                continue
            task = conn.recv()
            if task is None:
                return
            if isinstance(task, tuple) and task[0] == "setup":
                _, geometry, clip_samples = task
                continue
            conn.send(("begin", task.file_index))
            for message in decode(task, geometry, clip_samples):
                _send(conn, message)  # blocks while the main process lets this pipe fill
            conn.send(("end", task.file_index))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return  # the main process went away


@dataclass
class _Raised:
    exc: BaseException


@dataclass
class _Worker:
    proc: object
    conn: object
    assigned: list  # file indexes handed to it, in order
    buffered_bytes: int = 0
    started: int = -1  # the file it announced it is decoding


class Tick:
    """Yielded while nothing arrives, so the consumer can react to a stop request."""


_CONTEXT = mp.get_context("spawn")  # never fork a process that holds torch threads


def _start_process(index: int):
    mine, theirs = _CONTEXT.Pipe(duplex=True)
    proc = _CONTEXT.Process(target=_worker_main, daemon=True, name=f"fusefeat-decode-{index}",
                            args=(theirs,))
    proc.start()
    theirs.close()
    return proc, mine


def _stop_processes(started) -> None:
    """End decoding processes [(process, connection)]: ask all, then wait, then kill."""
    for _, conn in started:
        try:
            conn.send(None)
        except (OSError, ValueError):
            pass
    for proc, conn in started:
        proc.join(timeout=1.0)
        if proc.is_alive():
            proc.kill()  # workers ignore SIGTERM
            proc.join(timeout=1.0)
        conn.close()


class WarmWorkers:
    """Decoding processes started ahead of their DecodePool (while the model loads: a new
    interpreter and its imports take ~0.3 s of CPU). A pool adopts them; close() ends the
    ones no pool took."""

    def __init__(self, count: int):
        self._idle = [_start_process(i) for i in range(max(0, count))]

    def take(self):
        return self._idle.pop(0) if self._idle else None

    def close(self) -> None:
        _stop_processes(self._idle)
        self._idle = []


class DecodePool:
    """Iterate over Segments and Failed messages for `tasks`, in task order (and Tick)."""

    QUEUE_DEPTH = 2  # files handed to a worker ahead of the one it decodes

    def __init__(self, tasks: Sequence[DecodeTask], geometry: Geometry,
                 clip_samples: Optional[int] = None, workers: int = 2, prefetch_mb: float = 64,
                 warm: Optional[WarmWorkers] = None):
        self.tasks = list(tasks)
        self.geometry = geometry
        self.clip_samples = clip_samples
        self.workers = workers
        total = max(2, int(prefetch_mb * 2**20))
        self.handed_budget = total // 2  # bytes handed out by the reading thread, not yet taken
        self.budget = max(1, (total - self.handed_budget) // max(1, workers))  # per worker
        self._reader: Optional[threading.Thread] = None
        self._stop_reading = threading.Event()
        self._warm = warm
        self._pool: list[_Worker] = []
        self._idle_deaths = 0  # workers that died in a row without a file: a broken environment

    def __iter__(self) -> Iterator:
        if self.workers <= 0:
            for task in self.tasks:
                yield from decode(task, self.geometry, self.clip_samples)
            return
        yield from self._read_in_background()

    def _read_in_background(self) -> Iterator:
        """_parallel() run by a thread; its messages handed on through a queue bounded in
        bytes. Tick when nothing arrives for 0.5 s; the thread's errors are raised here."""
        handed: queue.Queue = queue.Queue()
        self._handed = handed  # (tests look at what waits here while the consumer is busy)
        room = threading.Condition()
        waiting = [0]  # bytes in `handed`
        done = object()

        def size(message) -> int:
            return message.wave.nbytes if isinstance(message, Segment) else 0

        def read() -> None:
            messages = self._parallel()
            try:
                for message in messages:
                    if self._stop_reading.is_set():
                        break
                    if isinstance(message, Tick):
                        continue
                    with room:  # one message always passes, however large
                        while (waiting[0] and waiting[0] + size(message) > self.handed_budget
                               and not self._stop_reading.is_set()):
                            room.wait(0.5)
                        waiting[0] += size(message)
                    handed.put(message)
            except BaseException as exc:  # noqa: BLE001 - raised again in the consumer
                handed.put(_Raised(exc))
            finally:
                messages.close()  # stops the workers
                handed.put(done)

        self._stop_reading.clear()
        self._reader = threading.Thread(target=read, name="fusefeat-decode-reader", daemon=True)
        self._reader.start()
        try:
            while True:
                try:
                    message = handed.get(timeout=0.5)
                except queue.Empty:
                    yield Tick()
                    continue
                if message is done:
                    return
                if isinstance(message, _Raised):
                    raise message.exc
                with room:
                    waiting[0] -= size(message)
                    room.notify()
                yield message
        finally:
            self._stop_reader()

    def _stop_reader(self) -> None:
        reader = self._reader
        if reader is not None and reader is not threading.current_thread():
            self._stop_reading.set()
            reader.join()
            self._reader = None

    def _spawn(self) -> _Worker:
        started = self._warm.take() if self._warm is not None else None
        proc, conn = started or _start_process(len(self._pool))
        worker = _Worker(proc, conn, [])
        try:
            conn.send(("setup", self.geometry, self.clip_samples))
        except (OSError, ValueError):
            pass  # it died already: its sentinel will tell
        self._pool.append(worker)
        return worker

    def _parallel(self) -> Iterator:
        order = [t.file_index for t in self.tasks]
        by_index = {t.file_index: t for t in self.tasks}
        buffered: dict[int, list] = {}  # file index -> messages not yet handed out
        ended: set[int] = set()
        owner: dict[int, _Worker] = {}  # file index -> worker decoding it
        pending = list(reversed(self.tasks))  # not yet handed to a worker (pop from the end)
        position = 0  # index in `order` of the file being handed out
        for _ in range(self.workers):
            self._spawn()

        def assign() -> None:
            for worker in sorted(self._pool, key=lambda w: len(w.assigned)):
                while pending and len(worker.assigned) <= self.QUEUE_DEPTH:
                    task = pending.pop()
                    try:
                        worker.conn.send(task)
                    except (OSError, ValueError):  # it died: its sentinel will tell
                        pending.append(task)
                        break
                    worker.assigned.append(task.file_index)
                    owner[task.file_index] = worker

        try:
            assign()
            while position < len(order):
                current = order[position]
                while buffered.get(current):
                    message = buffered[current].pop(0)
                    if isinstance(message, Segment):
                        owner_of = owner.get(current)
                        if owner_of is not None:
                            owner_of.buffered_bytes -= message.wave.nbytes
                    yield message
                if current in ended:
                    buffered.pop(current, None)
                    position += 1
                    continue
                # read from the current file's worker always, from others while under budget
                readable = [w for w in self._pool
                            if (w.assigned and w.assigned[0] == current)
                            or w.buffered_bytes < self.budget]
                ready = wait([w.conn for w in readable] + [w.proc.sentinel for w in self._pool],
                             timeout=0.5)
                if not ready:
                    yield Tick()
                    continue
                for worker in list(self._pool):
                    if worker.conn in ready and worker in readable:
                        try:
                            message = _recv(worker.conn)
                        except (EOFError, OSError):  # the worker is gone (its pipe closed)
                            worker.proc.join(timeout=5.0)
                            self._bury(worker, by_index, buffered, ended, pending, owner)
                            continue
                        self._receive(worker, message, buffered, ended)
                    elif worker.proc.sentinel in ready:
                        # messages it sent before dying are still in the pipe: take them first
                        while worker in readable and worker.conn.poll(0):
                            try:
                                self._receive(worker, _recv(worker.conn), buffered, ended)
                            except (EOFError, OSError):
                                break
                        self._bury(worker, by_index, buffered, ended, pending, owner)
                assign()
        finally:
            self.close()

    def _receive(self, worker: _Worker, message, buffered, ended) -> None:
        self._idle_deaths = 0  # workers do work: deaths are not an environment problem
        if isinstance(message, tuple) and message[0] == "begin":
            worker.started = message[1]
            return
        if isinstance(message, tuple) and message[0] == "end":
            ended.add(message[1])
            if worker.assigned and worker.assigned[0] == message[1]:
                worker.assigned.pop(0)
            return
        buffered.setdefault(message.file_index, []).append(message)
        if isinstance(message, Segment):
            worker.buffered_bytes += message.wave.nbytes

    def _bury(self, worker, by_index, buffered, ended, pending, owner) -> None:
        """A worker died: its current file failed, its queued files go back to the others."""
        self._pool.remove(worker)
        worker.conn.close()
        if not worker.assigned or worker.started != worker.assigned[0]:
            self._idle_deaths += 1  # it died between files: nothing of ours is lost
            for index in reversed(worker.assigned):
                owner.pop(index, None)
                pending.append(by_index[index])
            if self._idle_deaths > 3 * max(1, self.workers):
                raise FusefeatError(
                    "the decoding worker processes keep dying before reading any file",
                    hint="run with --num-workers 0 to decode in the main process and see the error")
        else:
            current, *queued = worker.assigned
            task = by_index[current]
            buffered[current] = [m for m in buffered.get(current, []) if not isinstance(m, Segment)]
            buffered[current].append(Failed(current, FileFailure(
                task.key, "decode", "DecoderCrashed",
                f"the decoder process died (exit code {worker.proc.exitcode}) while reading this "
                "file; the file is probably corrupt")))
            ended.add(current)
            for index in reversed(queued):
                owner.pop(index, None)
                pending.append(by_index[index])
        self._spawn()

    def close(self) -> None:
        self._stop_reader()  # the reading thread stops the workers on its way out
        _stop_processes([(worker.proc, worker.conn) for worker in self._pool])
        self._pool.clear()
