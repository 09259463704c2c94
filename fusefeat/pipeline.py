"""`fusefeat.extract`: the whole job, from inputs to committed shards.

    discover -> decode (workers) -> batch (length buckets) -> device (resample, front end,
    taps, fusion) -> assemble rows -> write (background thread, atomic shards)

Resumable: files already committed in the output directory are skipped; SIGINT/SIGTERM stop
the run after the batch in flight, commit what is complete, and report "interrupted".
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import signal
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Optional, Sequence

from fusefeat import __version__
from fusefeat.errors import (EXIT_INTERRUPTED, EXIT_OK, EXIT_PARTIAL, FileFailure, UsageError,
                             WriteError)

DEFAULT_OUT = "fusefeat_out"


@dataclass
class ExtractOptions:
    model: Optional[str] = None
    config_file: Optional[str] = None
    layers: Optional[object] = None  # "5,12", [5, 12], "all", None = the paper's pair
    weights: Optional[str] = None
    out: str = DEFAULT_OUT
    device: str = "auto"
    batch_size: int = 16
    batch_seconds: Optional[float] = 320.0  # audio per batch: fewer long clips per batch
    num_workers: int = 2
    clip_seconds: Optional[float] = None
    window_seconds: Optional[float] = None  # default: the preset's
    precision: str = "fp32"
    save_layers: bool = False
    baseline: bool = False
    save_frames: bool = False
    shard_size: int = 1000
    commit_seconds: float = 600.0
    shard: Optional[tuple] = None  # (I, N): process only part I of N
    devices: Optional[object] = None  # "cuda:0,cuda:1" or a list: one worker process per device
    device_slot: Optional[int] = None  # set by --devices for its worker processes
    overwrite: bool = False
    retry_failed: bool = False
    refresh_changed: bool = False
    progress: bool = True
    prefetch_mb: float = 64.0  # decoded audio ahead of the model: ~2 batches of 10 s at 44.1 kHz


@dataclass
class Summary:
    status: str  # "complete", "partial" (some files failed), "interrupted"
    output: str
    model: str
    layers: list
    dim: int
    files: int  # input files in this part
    extracted: int  # extracted by this run
    failed: int  # failed in this run
    skipped: int  # already committed (or already failed) before this run
    failed_total: int  # files whose latest record is a failure
    pending: int  # still to do (after an interruption)
    seconds: float  # the whole call: discovery, model loading, extraction
    loop_seconds: float  # decoding to last commit (what throughput is measured on)
    clips_per_second: float  # extracted / loop_seconds
    shards: list = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if self.status == "interrupted":
            return EXIT_INTERRUPTED
        return EXIT_PARTIAL if self.failed_total else EXIT_OK

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


_STOP_REQUESTED = []  # a stop asked for before the run installed its handlers


def request_stop() -> None:
    """Make the next run of this process stop (and commit) as soon as it starts."""
    _STOP_REQUESTED.append(True)


class _StopFlag:
    """SIGINT/SIGTERM: finish the batch in flight, commit, exit. A second signal is immediate.

    The worker processes of --devices listen to SIGUSR1 instead (their parent forwards one
    stop request per signal it receives, see fusefeat.devices)."""

    def __init__(self, signals=(signal.SIGINT, signal.SIGTERM)):
        self.stopped = False
        self.signal_name = ""
        self.signals = tuple(signals)
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        if _STOP_REQUESTED:
            _STOP_REQUESTED.clear()
            self.stopped, self.signal_name = True, "stop request"
        return self

    def _handle(self, signum, frame):
        if self.stopped:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.stopped = True
        self.signal_name = signal.Signals(signum).name
        print(f"\nfusefeat: {self.signal_name} received: finishing the current batch and "
              "committing; run the same command again to resume", file=sys.stderr)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device", hint="use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine",
                         hint="use --device cpu (or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def plan_layers(options: ExtractOptions):
    """The preset, backbone class and resolved layers: everything checkable before loading."""
    from fusefeat.backbones import backbone_class
    from fusefeat.config import load_preset
    from fusefeat.layers import parse_layers

    preset = load_preset(options.model, options.config_file)
    cls = backbone_class(preset)
    table = cls.table(preset, weights=options.weights)
    numbers = [info.number for info in table]
    default = cls.default_layers(preset, table)
    taps = parse_layers(options.layers, numbers, default, model=preset.name)
    return preset, cls, table, taps


def extract(inputs: Sequence[str] = (), options: Optional[ExtractOptions] = None, *,
            files_from: Optional[str] = None, stdin: Optional[IO[str]] = None,
            null_separated: bool = False, log=None, selection=None, stop_signals=None,
            **overrides) -> Summary:
    """Extract fused vectors for every audio file under `inputs` into `options.out`.

    With `options.devices` (several), one worker process per device does the work (see
    fusefeat.devices). `selection` (files, discovery failures) is the share of one such
    worker, already discovered by its parent; `stop_signals` the signals it stops on."""
    import torch

    from fusefeat.audio import AUDIO_EXTENSIONS
    from fusefeat.assemble import Assembler
    from fusefeat.batching import Batcher
    from fusefeat.loader import DecodePool, DecodeTask, Failed, Tick, WarmWorkers
    from fusefeat.runner import Runner
    from fusefeat.store import layout
    from fusefeat.store.lock import SlotLock
    from fusefeat.store.manifest import check_output, prepare_output
    from fusefeat.store.scan import scan
    from fusefeat.store.writer import BackgroundWriter, Schema, ShardWriter
    from fusefeat.windows import Geometry

    options = options or ExtractOptions()
    for key, value in overrides.items():
        setattr(options, key, value)
    log = log or (lambda message: print(f"fusefeat: {message}", file=sys.stderr))
    started = time.monotonic()
    _check_options(options)
    if options.devices is not None and selection is None:
        from fusefeat.devices import extract_on_devices, parse_devices

        devices = parse_devices(options.devices)
        if len(devices) > 1:
            return extract_on_devices(inputs, options, devices, files_from=files_from,
                                      stdin=stdin, null_separated=null_separated, log=log)
        options.device, options.devices = devices[0], None

    preset, cls, table, taps = plan_layers(options)
    device = resolve_device(options.device)
    if options.precision == "fp16" and device.type != "cuda":
        raise UsageError("--precision fp16 needs a CUDA device",
                         hint="on the CPU use fp32, or bf16 (CPU autocast; fast only where the "
                              "processor has bf16 units)")

    check_output(Path(options.out))  # before the weights load: fail in a second
    part, parts = options.shard or (0, 1)
    if selection is None:
        files, discover_failures, skipped_names = discover_part(
            inputs, part, parts, files_from=files_from, stdin=stdin,
            null_separated=null_separated)
    else:
        files, discover_failures = selection
        skipped_names = 0
    if not files and not discover_failures:
        where = ", ".join(list(inputs) + ([f"--files-from {files_from}"] if files_from else []))
        log(f"warning: no audio files found in {where}"
            + (f" ({skipped_names} other file(s) skipped: only these extensions are read: "
               f"{', '.join(sorted(AUDIO_EXTENSIONS))})" if skipped_names else "")
            + "; nothing to do")

    # decoding processes start while the weights load (their interpreters take ~0.3 s of
    # CPU); they get the geometry once the model is known
    warm = WarmWorkers(options.num_workers if files else 0)
    try:
        backbone = cls.build(preset, weights=options.weights).to(device).eval()
        window_seconds = options.window_seconds or preset.window_seconds
        window = max(backbone.window_align,
                     int(window_seconds * backbone.sample_rate) // backbone.window_align
                     * backbone.window_align)
        geometry = Geometry(sample_rate=backbone.sample_rate, window=window,
                            align=backbone.window_align, context=backbone.context_samples,
                            lookahead=backbone.lookahead_samples, min_samples=backbone.min_samples)
        clip_samples = (int(round(options.clip_seconds * backbone.sample_rate))
                        if options.clip_seconds else None)

        schema = Schema(dim=sum(backbone.layer(n).frame_dim for n in taps),
                        layer_dims={n: backbone.layer(n).frame_dim for n in taps} if options.save_layers else {},
                        baseline_dim=backbone.baseline_dim if options.baseline else None,
                        frames_dim=sum(backbone.layer(n).frame_dim for n in taps) if options.save_frames else None)
        fields = {
            "model": preset.name, "preset": preset.numbers_that_matter(),
            "weights": backbone.weights_id, "layers": list(taps),
            "clip_seconds": options.clip_seconds, "window_samples": window,
            "baseline": options.baseline, "save_layers": options.save_layers,
            "save_frames": options.save_frames, "precision": options.precision,
            "fusefeat_version": __version__,
        }
        out = Path(options.out)
        manifest = prepare_output(out, fields, options.overwrite,
                                  extra={"model": preset.name, "layers": list(taps), "dim": schema.dim})
        slot = layout.Slot(part, parts, options.device_slot)
        lock = SlotLock(out, slot.label).acquire()
        marker_inputs = _marker_inputs(inputs, files_from)
        try:
            write_part_marker(out, slot, {"status": "running", "files": len(files)}, marker_inputs)
            if lock.exclusive:  # nobody else writes this slot: its temporary files are leftovers
                for stale in layout.temp_files(out, slot.label):
                    stale.unlink(missing_ok=True)
            state = scan(out, quarantine=lock.exclusive, warn=log, part=(part, parts))
            todo, skipped = _select_todo(files, state, options, log)
            recorded = set(state.failures)  # paths whose latest record is a failure
            new_discover_failures = [f for f in discover_failures if f.path not in recorded]
            attrs = _shard_attrs(preset, backbone, taps, table, schema, manifest, fields, options,
                                 slot)
            writer = BackgroundWriter(ShardWriter(out, slot, layout.new_run_id(), attrs, schema,
                                                  options.shard_size, options.commit_seconds))
            for failure in new_discover_failures:
                writer.put_error(failure)
            counts = {"extracted": 0, "failed": len(new_discover_failures)}
            tasks = [DecodeTask(i, f.key, f.source) for i, f in enumerate(todo)]
            runner = Runner(backbone, taps, options.baseline, options.save_frames, device,
                            options.precision)
            assembler = Assembler(backbone, taps, options.baseline, options.save_layers,
                                  options.save_frames, key_of=lambda i: todo[i].key)
            batcher = Batcher(
                key=lambda s: backbone.batch_key(s.piece.padded_length, s.piece.drop_left, s.piece.keep),
                samples=lambda s: s.piece.padded_length, batch_size=options.batch_size,
                batch_samples=(int(options.batch_seconds * backbone.sample_rate)
                               if options.batch_seconds else None),
                max_pending=4 * options.batch_size)
            failed_files: set[int] = set()
            progress = _progress(len(todo), options.progress)

            def record_failure(file_index: int, failure: FileFailure) -> None:
                if file_index in failed_files:
                    return
                failed_files.add(file_index)
                assembler.drop(file_index)
                writer.put_error(failure)
                counts["failed"] += 1
                progress.update(1)

            inflight: list = []  # results of the last batch, not yet read back from the device

            def finish(results) -> None:
                for result in results:
                    for row in assembler.add(result):  # reads back from the device (a sync)
                        writer.put_row(row)
                        counts["extracted"] += 1
                        progress.update(1)

            # On a GPU the front end of a batch runs in a thread while the network runs on the
            # batch before it (its host copies and launches overlap the GPU's work). On a CPU the
            # network already keeps every core busy: work beside it preempts one of the network's
            # threads while the others wait for it, so it costs more than running it in turn
            # (measured on 2 cores, VGGish, 200 clips: 9.3-9.5 clips/s beside, 9.5-9.7 in turn).
            ahead = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="fusefeat-frontend")
                     if device.type != "cpu" else None)
            pending: list = []  # [(segments, future of runner.featurized)]: at most one

            def forward_pending() -> None:
                """Run the network on the batch whose front end was started last, then read back
                the batch before it: on CUDA the CPU prepares and assembles while the GPU works."""
                if not pending:
                    return
                segments, future = pending.pop()
                ready = future.result()
                kept = [s for s in segments if s.file_index not in failed_files]
                if not kept:
                    return
                if len(kept) != len(segments):  # a file failed meanwhile: compute the rest again
                    segments, ready = kept, None
                results, failures = runner.run_safely(segments, keys=lambda i: todo[i].key,
                                                      ready=ready)
                for file_index, failure in failures:
                    record_failure(file_index, failure)
                previous = inflight[:]
                inflight[:] = results
                finish(previous)

            def run(batch) -> None:
                batch = [s for s in batch if s.file_index not in failed_files]
                if not batch:
                    return
                if runner.max_batch is not None:
                    batcher.batch_size = min(batcher.batch_size, runner.max_batch)
                if ahead is None:
                    future = Future()
                    future.set_result(runner.featurized(batch))
                else:
                    future = ahead.submit(runner.featurized, batch)  # starts now, in the thread
                forward_pending()  # the batch before (on a GPU, while the thread works)
                pending.append((batch, future))

            pool = DecodePool(tasks, geometry, clip_samples, workers=options.num_workers,
                              prefetch_mb=options.prefetch_mb, warm=warm)
            loop_started = time.monotonic()
            # no_grad: the caller's own autograd state is kept
            with torch.no_grad(), _StopFlag(stop_signals or (signal.SIGINT, signal.SIGTERM)) as stop:
                interrupted = False
                try:
                    for message in pool:
                        if stop.stopped:
                            interrupted = True
                            break
                        if isinstance(message, Tick):
                            continue
                        if isinstance(message, Failed):
                            record_failure(message.file_index, message.failure)
                            continue
                        for batch in batcher.add(message):
                            run(batch)
                            if stop.stopped:
                                break
                    if not interrupted and not stop.stopped:
                        for batch in batcher.flush():
                            run(batch)
                            if stop.stopped:
                                break
                        if not stop.stopped:
                            forward_pending()
                    finish(inflight)  # what was computed is kept, also when stopping
                    inflight.clear()
                    interrupted = interrupted or stop.stopped
                    committed = writer.close(commit=True)
                except WriteError as exc:
                    writer.close(commit=False, raise_errors=False)
                    done = writer.writer.committed_records
                    exc.hint = (f"{exc.hint} ({done} file record(s) committed before the failure)"
                                if exc.hint else None)
                    raise
                except BaseException:
                    # a bug, or an immediate second signal: drop the open shard (its files stay
                    # pending), keep every committed one, and let the error show
                    writer.close(commit=False, raise_errors=False)
                    raise
                finally:
                    if ahead is not None:  # a stop drops the batch ahead
                        ahead.shutdown(wait=True, cancel_futures=True)
                    pool.close()
                    progress.close()
            loop_seconds = time.monotonic() - loop_started
            done_now = counts["extracted"] + counts["failed"] - len(new_discover_failures)
            final_state_failures = _failed_after(state, files, discover_failures, todo, failed_files)
            elapsed = time.monotonic() - started
            summary = Summary(
                status="interrupted" if interrupted else ("partial" if final_state_failures else "complete"),
                output=str(out), model=preset.name, layers=list(taps), dim=schema.dim,
                files=len(files), extracted=counts["extracted"], failed=counts["failed"],
                skipped=skipped, failed_total=final_state_failures,
                pending=max(0, len(todo) - done_now), seconds=round(elapsed, 3),
                loop_seconds=round(loop_seconds, 3),
                clips_per_second=round(counts["extracted"] / loop_seconds, 3) if loop_seconds else 0.0,
                shards=[p.name for p in committed])
            try:
                write_part_marker(out, slot, asdict(summary), marker_inputs)
            except OSError as exc:  # the shards are committed; only `info`/`status` counts suffer
                log(f"warning: cannot write {out / 'parts'} ({exc.strerror or exc}); the features "
                    "are committed, but `fusefeat info` and `status` will not know this run's counts")
        except Exception as exc:
            write_error_marker(out, slot, len(files), f"{type(exc).__name__}: {exc}", marker_inputs)
            raise
        finally:
            lock.release()
        return summary
    finally:
        warm.close()  # those no pool adopted (a failure before decoding)


def _check_options(options: ExtractOptions) -> None:
    if options.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if options.clip_seconds is not None and options.clip_seconds <= 0:
        raise UsageError("--clip-seconds must be positive")
    if options.window_seconds is not None and options.window_seconds <= 0:
        raise UsageError("--window-seconds must be positive")
    if options.shard_size < 1:
        raise UsageError("--shard-size must be at least 1")
    if options.precision not in ("fp32", "bf16", "fp16"):
        raise UsageError(f"--precision {options.precision!r}: use fp32, bf16 or fp16")
    if options.retry_failed and options.overwrite:
        raise UsageError("--retry-failed and --overwrite contradict each other")
    if options.shard is not None:
        part, parts = options.shard
        if parts < 1 or not 0 <= part < parts:
            raise UsageError(f"--shard {part}/{parts}: I must be in 0..N-1")
        if parts > 1 and options.overwrite:
            raise UsageError(
                "--overwrite with --shard (or under a SLURM array) would let every part delete "
                "the features of the others",
                hint="empty the output directory once (or choose a new --out) before the array "
                     "starts")


def _select_todo(files, state, options: ExtractOptions, log):
    todo, skipped = [], 0
    changed = 0
    for f in files:
        record = state.latest.get(f.key)
        if record is None:
            todo.append(f)
            continue
        _, row, size, mtime = record
        if row < 0:
            if options.retry_failed:
                todo.append(f)
            else:
                skipped += 1
            continue
        if options.refresh_changed and _changed(f.source, size, mtime):
            todo.append(f)
            changed += 1
            continue
        skipped += 1
    if changed:
        log(f"{changed} file(s) changed since they were extracted: extracting them again")
    return todo, skipped


def _changed(source: str, size: int, mtime_ns: int) -> bool:
    try:
        st = os.stat(source)
    except OSError:
        return False  # gone: keep the committed row
    return st.st_size != size or st.st_mtime_ns != mtime_ns


def _failed_after(state, files, discover_failures, todo, failed_files) -> int:
    """Files of this run's input (this part's) whose latest record is a failure once this
    run's records are in. Failures of other parts do not count here."""
    mine = {f.key for f in files} | {f.path for f in discover_failures}
    retried = {f.key for f in todo}
    still = {k for k in state.failures if k in mine and k not in retried}
    still |= {todo[i].key for i in failed_files}
    still |= {f.path for f in discover_failures}
    return len(still)


def _shard_attrs(preset, backbone, taps, table, schema, manifest, fields, options, slot) -> dict:
    import torch

    def version(package: str) -> str:  # without importing it (transformers takes seconds)
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return ""

    transformers_version = version("transformers")
    torchaudio_version = version("torchaudio")
    config = {k: v for k, v in asdict(options).items() if k not in ("progress",)}
    return {
        "model": preset.name,
        "layers": json.dumps(list(taps)),
        "layer_modules": json.dumps({str(n): backbone.layer(n).module for n in taps}),
        "layer_dims": json.dumps({str(n): d for n, d in schema.layer_dims.items()}),
        "dim": schema.dim,
        "baseline_dim": schema.baseline_dim or 0,
        "frames_dim": schema.frames_dim or 0,
        "pooling": backbone.pooling,
        "sample_rate_model": backbone.sample_rate,
        "fusefeat_version": __version__,
        "torch_version": torch.__version__,
        "torchaudio_version": torchaudio_version,
        "transformers_version": transformers_version,
        "weights_id": backbone.weights_id,
        "preset": preset.to_json(),
        "config": json.dumps(config, default=str, sort_keys=True),
        "fingerprint": manifest["fingerprint"],
        "fingerprint_fields": json.dumps(fields, sort_keys=True, default=str),
        "part": f"{slot.part}/{slot.parts}",
        "flag_bits": json.dumps({"1": "padded", "2": "silent", "4": "truncated", "8": "clipped"}),
    }


def discover_part(inputs, part: int, parts: int, files_from=None, stdin=None,
                  null_separated: bool = False):
    """The files of part `part` of `parts`, and the discovery failures that belong to it."""
    from fusefeat import discover as disc

    found = disc.discover(inputs, files_from=files_from, stdin=stdin,
                          null_separated=null_separated, part=(part, parts))
    failures = [f for f in found.failures if parts <= 1 or disc.part_of(f.path, parts) == part]
    return found.files, failures, found.skipped


def _marker_inputs(inputs, files_from) -> list:
    return ([os.path.abspath(p) for p in inputs]
            + ([os.path.abspath(files_from)] if files_from not in (None, "-") else []))


def write_part_marker(out: Path, slot, data: dict, inputs: list) -> None:
    """DIR/parts/<slot>.json: "running" when a run starts, then its summary (or "error")."""
    import socket

    from fusefeat.store import layout
    from fusefeat.store.atomic import write_json_atomic

    marker = Path(out) / layout.PARTS / f"{slot.label}.json"
    data = dict(data)
    data.update({"part": slot.part, "parts": slot.parts, "device_slot": slot.device,
                 "host": socket.gethostname(), "pid": os.getpid(), "cwd": os.getcwd(),
                 "inputs": inputs, "updated_unix": time.time(),
                 "slurm": {k: os.environ[v] for k, v in
                           (("job_id", "SLURM_JOB_ID"), ("array_job_id", "SLURM_ARRAY_JOB_ID"),
                            ("array_task_id", "SLURM_ARRAY_TASK_ID")) if v in os.environ}})
    if data["status"] != "running":
        data["finished_unix"] = data["updated_unix"]
    write_json_atomic(marker, data)


def write_error_marker(out: Path, slot, files: int, error: str, inputs: list) -> None:
    """The part's marker says "error", so `fusefeat status` reports it failed (and resubmits
    it); best effort: the error being raised matters more than its marker."""
    try:
        write_part_marker(out, slot, {"status": "error", "files": files, "error": error}, inputs)
    except OSError:
        pass


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="file", desc="fusefeat", file=sys.stderr, dynamic_ncols=True,
                disable=not enabled or not sys.stderr.isatty(), leave=False)
