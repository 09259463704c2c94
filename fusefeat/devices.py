"""`--devices cuda:0,cuda:1,...`: one worker process per device on one machine.

The parent discovers the inputs once (so a list on stdin is read once), keeps its part
(--shard I/N), and deals the part's files out to the devices round-robin in path order:
worker d takes files d, d+D, d+2D, ... of the sorted list, so the workers get equal counts
and a mix of the same directories. Each worker is `extract()` on its share with its own slot
(`Slot(part, parts, device=d)`: shards `shard-pIIIIofNNNN-dD-...`, lock `.lock-pIIIIofNNNN-dD`,
marker `parts/pIIIIofNNNN-dD.json`). Resume does not depend on the deal: the resume index
covers every committed shard of the directory, whichever worker wrote it.

The parent holds the part's own lock (`.lock-pIIIIofNNNN`, so a second run of the same part
is refused), writes the part's marker, waits, and sums the workers' summaries into one JSON
summary and one exit code.

Signals: workers ignore SIGINT/SIGTERM, which a terminal or SLURM may send to every process
of the job, and stop on SIGUSR1 instead, which the parent sends once per SIGINT/SIGTERM it
receives: the first asks them to commit and stop (exit 75), a second stops them at once. A
worker whose parent dies stops by itself the same way.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path

from fusefeat.errors import EXIT_FATAL, FusefeatError, UsageError

STOP_SIGNAL = signal.SIGUSR1


def parse_devices(value) -> list[str]:
    """'cuda:0,cuda:1' (or a list) -> ['cuda:0', 'cuda:1']; 'all' -> every visible GPU."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    devices = [str(d).strip() for d in items if str(d).strip()]
    if devices == ["all"]:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError("--devices all: this machine has no visible GPU",
                             hint="use --device cpu, or name devices: --devices cuda:0,cuda:1")
        devices = [f"cuda:{i}" for i in range(count)]
    if not devices:
        raise UsageError("--devices is empty", hint="e.g. --devices cuda:0,cuda:1")
    return devices


def deal(files: list, count: int) -> list[list]:
    """The share of each of `count` devices: round-robin over the (sorted) list."""
    return [files[d::count] for d in range(count)]


def extract_on_devices(inputs, options, devices: list[str], *, files_from=None, stdin=None,
                       null_separated: bool = False, log=None):
    from fusefeat.pipeline import (Summary, _marker_inputs, discover_part, plan_layers,
                                   resolve_device, write_error_marker, write_part_marker)
    from fusefeat.store import layout
    from fusefeat.store.lock import SlotLock
    from fusefeat.store.manifest import clear_output

    log = log or (lambda message: print(f"fusefeat: {message}", file=sys.stderr))
    started = time.monotonic()
    plan_layers(options)  # a bad model or --layers fails here, once, not in every worker
    for device in set(devices):
        resolve_device(device)
    part, parts = options.shard or (0, 1)
    files, failures, _ = discover_part(inputs, part, parts, files_from=files_from, stdin=stdin,
                                       null_separated=null_separated)
    out = Path(options.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FusefeatError(f"cannot create the output directory {out}: {exc.strerror}",
                            hint="choose a writable --out") from None
    slot = layout.Slot(part, parts)
    marker_inputs = _marker_inputs(inputs, files_from)
    lock = SlotLock(out, slot.label).acquire()
    try:
        if options.overwrite:  # once, here: never in the workers
            clear_output(out)
        write_part_marker(out, slot, {"status": "running", "files": len(files),
                                      "devices": devices}, marker_inputs)
        shares = deal(files, len(devices))
        results, exits, stops = _run_workers(inputs, options, devices, shares, failures, log)
        errors = [r for r in results.values() if r[0] != "ok"]
        lost = [d for d in range(len(devices)) if d not in results]
        if errors or (lost and not stops):
            lines = [f"worker {d} ({devices[d]}): {r[1]}" for d, r in sorted(results.items())
                     if r[0] != "ok"]
            lines += [f"worker {d} ({devices[d]}) died (exit code {exits.get(d)}) without a "
                      "summary" for d in lost]
            error = FusefeatError("\n  ".join(["a device worker failed:"] + lines),
                                  hint=next((r[2] for r in errors if r[2]), None))
            error.exit_code = max([r[3] for r in errors] + [EXIT_FATAL])
            raise error
        summaries = [results[d][1] for d in sorted(results)]
        elapsed = time.monotonic() - started
        extracted = sum(s["extracted"] for s in summaries)
        interrupted = bool(lost) or any(s["status"] == "interrupted" for s in summaries)
        failed_total = sum(s["failed_total"] for s in summaries)
        first = summaries[0] if summaries else {}
        loop_seconds = max((s.get("loop_seconds", 0.0) for s in summaries), default=0.0)
        summary = Summary(
            status="interrupted" if interrupted else ("partial" if failed_total else "complete"),
            output=str(out), model=first.get("model", ""), layers=first.get("layers", []),
            dim=first.get("dim", 0), files=len(files), extracted=extracted,
            failed=sum(s["failed"] for s in summaries),
            skipped=sum(s["skipped"] for s in summaries), failed_total=failed_total,
            pending=sum(s["pending"] for s in summaries)
            + sum(len(shares[d]) for d in lost), seconds=round(elapsed, 3),
            loop_seconds=loop_seconds,  # the workers run side by side: the slowest counts
            clips_per_second=round(extracted / loop_seconds, 3) if loop_seconds else 0.0,
            shards=[name for s in summaries for name in s["shards"]])
        marker = asdict(summary)
        marker["devices"] = [{"device": devices[d], "slot": d, "files": len(shares[d]),
                              **({k: results[d][1][k] for k in
                                  ("status", "extracted", "failed", "pending")}
                                 if d in results else {"status": "lost"})}
                             for d in range(len(devices))]
        write_part_marker(out, slot, marker, marker_inputs)
    except Exception as exc:
        write_error_marker(out, slot, len(files), getattr(exc, "message", str(exc)),
                           marker_inputs)
        raise
    finally:
        lock.release()
    return summary


def _run_workers(inputs, options, devices, shares, failures, log):
    """Start one worker per device, forward stop requests, collect their results."""
    context = mp.get_context("spawn")  # never fork a process that holds torch threads
    messages = context.Queue()
    workers = []
    threads = max(1, (os.cpu_count() or 1) // len(devices))
    stops = 0

    def forward(signum, frame):
        nonlocal stops
        stops += 1
        if stops == 1:
            print(f"\nfusefeat: {signal.Signals(signum).name} received: asking the device "
                  "workers to commit and stop", file=sys.stderr)
        for proc in workers:
            if proc.is_alive() and proc.pid:
                try:
                    os.kill(proc.pid, STOP_SIGNAL)
                except ProcessLookupError:
                    pass

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, forward)
    results: dict[int, tuple] = {}
    try:
        for d, device in enumerate(devices):
            worker_options = replace(options, device=device, device_slot=d, devices=None,
                                     overwrite=False)
            proc = context.Process(
                target=_worker_main, name=f"fusefeat-device-{d}", daemon=False,
                args=(d, list(inputs), worker_options, shares[d], failures if d == 0 else [],
                      messages, threads))
            proc.start()
            workers.append(proc)
            if stops:  # a signal came while they started
                os.kill(proc.pid, STOP_SIGNAL)
        log(f"{len(devices)} device workers: " + ", ".join(
            f"{device} ({len(shares[d])} files)" for d, device in enumerate(devices)))
        while True:
            try:
                d, result = messages.get(timeout=0.2)
                results[d] = result
                continue
            except queue.Empty:
                pass
            if not any(p.is_alive() for p in workers):
                while True:  # what the last ones sent before exiting
                    try:
                        d, result = messages.get(timeout=0.5)
                        results[d] = result
                    except queue.Empty:
                        break
                break
    finally:
        for proc in workers:
            proc.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    exits = {d: p.exitcode for d, p in enumerate(workers)}
    return results, exits, stops


def _worker_main(d, inputs, options, files, failures, messages, threads):
    """One device worker: `extract()` on its share, the result sent to the parent."""
    from fusefeat import pipeline

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides, see the module doc
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    early = []

    def stop_before_the_run(signum, frame):  # replaced by the run's own handler once it starts
        early.append(signum)
        if len(early) > 1:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        pipeline.request_stop()

    signal.signal(STOP_SIGNAL, stop_before_the_run)
    parent = os.getppid()

    def watch_parent():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os.kill(os.getpid(), STOP_SIGNAL)
                return

    threading.Thread(target=watch_parent, name="fusefeat-parent-watch", daemon=True).start()
    if str(options.device).startswith("cpu"):
        import torch

        torch.set_num_threads(threads)
    try:
        summary = pipeline.extract(inputs, options, selection=(files, failures),
                                   stop_signals=(STOP_SIGNAL,))
        messages.put((d, ("ok", asdict(summary))))
    except FusefeatError as exc:
        messages.put((d, ("error", exc.message, exc.hint, exc.exit_code)))
    except BaseException as exc:  # noqa: BLE001 - reported by the parent
        messages.put((d, ("crash", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}",
                          None, EXIT_FATAL)))
    messages.close()
    if os.getppid() != parent:  # nobody will read it: do not wait to flush it (see loader)
        messages.cancel_join_thread()
    else:
        messages.join_thread()
