#!/usr/bin/env python
"""Throughput benchmark: is the backbone the only limit?

For each backbone, on N 10-second clips stored as 44.1 kHz WAV files, in one run:
  1. limit:    the bare forward pass with taps, on pre-decoded, pre-batched, pre-featurised
               tensors already on the device;
  2. fusefeat: `fusefeat extract` end to end (decode -> write), same batch size, in its own
               process (steady state: the summary's loop_seconds, decode to last commit);
  3. per-clip: the path people write today: the official front end + model, one clip at a
               time (torchvggish waveform_to_examples + VGG; transformers ASTFeatureExtractor +
               ASTModel; CNN14 one file at a time).
Prints clips/s, the ratios 2/1 and 2/3 and peak RSS; writes JSON. Random weights in the official
formats (speed does not depend on the values). Runs unchanged on CUDA (--device cuda).

    python scripts/bench.py --models vggish,cnn14 --clips 200 --threads 2 --repeats 3
    python scripts/bench.py --models vggish --clips 200 --memory-clips 2000   # RSS flatness
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
SHARED_NOTES = REPO.parent / "shared" / "data" / "nsynth_mini60" / "audio"
CLIP_SECONDS, CLIP_RATE = 10.0, 44100


def make_clips(folder: Path, count: int, seed: int = 0) -> Path:
    """N 10 s clips at 44.1 kHz: real NSynth notes (resampled) when available, else noise."""
    folder.mkdir(parents=True, exist_ok=True)
    existing = sorted(folder.glob("*.wav"))
    if len(existing) >= count:
        return folder
    import torch
    import torchaudio

    rng = np.random.default_rng(seed)
    notes = []
    if SHARED_NOTES.is_dir():
        for path in sorted(SHARED_NOTES.glob("*.wav"))[:30]:
            wave, rate = sf.read(path, dtype="float32")
            notes.append(torchaudio.functional.resample(torch.from_numpy(wave), rate,
                                                        CLIP_RATE).numpy())
    length = int(CLIP_SECONDS * CLIP_RATE)
    for i in range(len(existing), count):
        if notes:
            parts = [notes[j] for j in rng.integers(0, len(notes), 3)]
            clip = np.concatenate(parts)[:length]
            clip = np.pad(clip, (0, length - clip.size)) + 0.01 * rng.standard_normal(length)
        else:
            clip = 0.1 * rng.standard_normal(length)
        sf.write(folder / f"clip{i:05d}.wav", clip.astype(np.float32), CLIP_RATE, subtype="PCM_16")
    return folder


def random_weights(model: str, folder: Path) -> Path:
    import torch

    from fusefeat.config import load_preset

    folder.mkdir(parents=True, exist_ok=True)
    preset = load_preset(model)
    torch.manual_seed(0)
    if model == "cnn14":
        from fusefeat.backbones.cnn14 import Cnn14

        path = folder / "cnn14.pth"
        if not path.exists():
            torch.save({"model": Cnn14.build(preset, random_init=True).net.state_dict()}, path)
    elif model == "vggish":
        from fusefeat.backbones.vggish import VGGish

        path = folder / "vggish.pth"
        if not path.exists():
            torch.save(VGGish.build(preset, random_init=True).net.state_dict(), path)
    elif model == "ast":
        from transformers import ASTConfig, ASTForAudioClassification

        path = folder / "ast"
        if not path.exists():
            ASTForAudioClassification(ASTConfig()).save_pretrained(path)  # full size, 12 x 768
    elif model == "yamnet":  # the real weights when the shared folder has them, else random
        real = REPO.parent / "shared" / "models" / "yamnet" / "yamnet.pth"
        path = real if real.exists() else folder / "yamnet.pth"
        if not path.exists():
            from fusefeat.backbones.yamnet import YAMNet

            torch.save(YAMNet.network(random_init=True).state_dict(), path)
    else:
        raise SystemExit(f"no random weights recipe for {model}")
    return path


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare_limit(model, weights, files, batch_size, device, precision):
    """The bare forward pass with taps on ready features on the device: returns a function
    that times one pass over all batches (clips/s), so that repeats reuse the features."""
    import torch

    from fusefeat import frontends
    from fusefeat.backbones import create
    from fusefeat.backbones.base import SegmentBatch
    from fusefeat.runner import PRECISIONS

    backbone = create(model, weights=str(weights), device=device)
    taps = backbone.preset.default_layers
    batches = []
    for start in range(0, len(files), batch_size):
        waves = [sf.read(f, dtype="float32")[0] for f in files[start:start + batch_size]]
        x = torch.from_numpy(np.stack(waves)).to(device)
        x = frontends.resample(x, CLIP_RATE, backbone.sample_rate)
        lengths = torch.full((x.shape[0],), x.shape[1], device=device)
        batch = SegmentBatch(x, lengths)
        with torch.inference_mode():
            batches.append((backbone.featurize(batch), batch))
    dtype = PRECISIONS[precision]

    def forward(features, batch):
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            return backbone.forward_taps(features, taps, False, batch)

    forward(*batches[0])  # warm-up (not timed)

    def timed_pass() -> float:
        sync(device)
        start = time.perf_counter()
        for features, batch in batches:
            forward(features, batch)
        sync(device)
        return len(files) / (time.perf_counter() - start)

    return timed_pass


def bench_fusefeat(model, weights, folder, out, batch_size, device, precision, threads, workers):
    """`fusefeat extract` in its own process; peak RSS of the largest process of the run."""
    args = [sys.executable, "-m", "fusefeat", "extract", str(folder), "-m", model, "-w",
            str(weights), "-o", str(out), "--overwrite", "-b", str(batch_size),
            "--batch-seconds", "1e9", "--device", str(device), "--precision", precision,
            "--num-workers", str(workers), "-q"]
    wrapper = ("import resource, subprocess, sys, json; r = subprocess.run(sys.argv[1:], "
               "capture_output=True, text=True); sys.stderr.write(r.stderr); "
               "print(json.dumps({'rc': r.returncode, 'out': r.stdout, "
               "'rss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", wrapper, *args], capture_output=True, text=True,
                          env=env)
    wall = time.perf_counter() - start
    report = json.loads(done.stdout.strip().splitlines()[-1])
    if report["rc"] != 0:
        raise SystemExit(f"fusefeat failed:\n{done.stderr}\n{report['out']}")
    summary = json.loads(report["out"].strip().splitlines()[-1])
    return {"clips_per_s": summary["clips_per_second"], "loop_seconds": summary["loop_seconds"],
            "wall_seconds": round(wall, 2), "peak_rss_mb": round(report["rss_kb"] / 1024, 1)}


def bench_per_clip(model, weights, files, device):
    """What people write today: the official front end and the model, one clip at a time."""
    import torch
    import torchaudio

    if model == "vggish":
        from fusefeat.backbones.weights import import_module_skipping_package_init

        tv = import_module_skipping_package_init("torchvggish", "torchvggish")
        vggish_input = import_module_skipping_package_init("torchvggish", "vggish_input")
        net = tv.VGG(tv.make_layers(), postprocess=False)
        net.load_state_dict(torch.load(weights, map_location="cpu"))
        net = net.eval().to(device)

        def one(path):
            data, rate = sf.read(path, dtype="int16")
            examples = vggish_input.waveform_to_examples(data / 32768.0, rate)  # resampy inside
            emb = net(examples.detach().to(device))
            return emb.max(0).values + emb.mean(0)
    elif model == "cnn14":
        from fusefeat.backbones.weights import import_module_skipping_package_init

        models = import_module_skipping_package_init("panns_inference", "models")
        net = models.Cnn14(sample_rate=16000, window_size=512, hop_size=160, mel_bins=64,
                           fmin=50, fmax=8000, classes_num=527)
        net.load_state_dict(torch.load(weights, map_location="cpu")["model"])
        net = net.eval().to(device)

        def one(path):
            data, rate = sf.read(path, dtype="float32")
            x = torchaudio.functional.resample(torch.from_numpy(data), rate, 16000)
            return net(x[None].to(device))["embedding"]
    elif model == "ast":
        from transformers import ASTFeatureExtractor, ASTModel

        extractor = ASTFeatureExtractor()
        net = ASTModel.from_pretrained(weights).eval().to(device)

        def one(path):
            data, rate = sf.read(path, dtype="float32")
            x = torchaudio.functional.resample(torch.from_numpy(data), rate, 16000).numpy()
            inputs = extractor(x, sampling_rate=16000, return_tensors="pt")
            return net(inputs["input_values"].to(device)).pooler_output
    elif model == "yamnet":  # the package's own (approximate) front end, one clip at a time
        from fusefeat.backbones.weights import import_module_skipping_package_init
        from fusefeat.backbones.yamnet import YAMNet

        proc = import_module_skipping_package_init("torch_vggish_yamnet", "input_proc")
        to_input = proc.WaveformToInput()
        net = YAMNet.network(random_init=False)
        net.load_state_dict(torch.load(weights, map_location="cpu"))
        net = net.eval().to(device)

        def one(path):
            data, rate = sf.read(path, dtype="float32")
            patches = to_input(torch.from_numpy(data)[None], rate)
            return net(patches.to(device), to_prob=True)
    else:
        raise SystemExit(model)
    with torch.inference_mode():
        one(files[0])
        sync(device)
        start = time.perf_counter()
        for path in files:
            one(path)
        sync(device)
    return len(files) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="vggish,cnn14,ast,yamnet")
    parser.add_argument("--clips", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    parser.add_argument("--workers", type=int, default=1, help="fusefeat --num-workers")
    parser.add_argument("--workdir", default="/tmp/fusefeat-bench")
    parser.add_argument("--json", default=None, help="where to write the results")
    parser.add_argument("--skip-per-clip", action="store_true")
    parser.add_argument("--repeats", type=int, default=1,
                        help="time the limit and fusefeat this many times, alternately, and "
                             "report medians (a shared machine's load drifts between runs)")
    parser.add_argument("--memory-clips", type=int, default=0,
                        help="also run fusefeat on this many clips and compare peak RSS")
    args = parser.parse_args()

    import torch

    from fusefeat.allocator import reuse_freed_memory
    from fusefeat.pipeline import resolve_device

    # the allocator `fusefeat extract` uses, here too: the limit and the per-clip path must not
    # pay page faults that fusefeat does not (CNN14 on 2 cores: 3.4 -> 4.8 clips/s bare)
    reuse_freed_memory()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    work = Path(args.workdir)
    folder = make_clips(work / "clips", max(args.clips, args.memory_clips))
    files = sorted(folder.glob("*.wav"))
    small = work / f"clips{args.clips}"
    small.mkdir(exist_ok=True)
    for f in files[: args.clips]:
        if not (small / f.name).exists():
            os.symlink(f, small / f.name)
    results = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                           "device": str(device), "threads": args.threads,
                           "cpu_count": os.cpu_count(),
                           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
               "clips": args.clips, "clip_seconds": CLIP_SECONDS, "clip_rate": CLIP_RATE,
               "batch_size": args.batch_size, "precision": args.precision, "models": {}}
    print(f"{'model':<8} {'limit':>9} {'fusefeat':>9} {'per-clip':>9} {'2/1':>6} {'2/3':>6} "
          f"{'RSS MB':>8}   (clips/s, {args.clips} x {CLIP_SECONDS:g} s at {CLIP_RATE} Hz, "
          f"batch {args.batch_size}, {device}, {args.precision})")
    for model in args.models.split(","):
        weights = random_weights(model, work / "weights")
        time_limit = prepare_limit(model, weights, files[: args.clips], args.batch_size, device,
                                   args.precision)
        limits, runs = [], []
        for _ in range(max(1, args.repeats)):  # alternated, so drift hits both alike
            limits.append(time_limit())
            runs.append(bench_fusefeat(model, weights, small, work / f"out-{model}",
                                       args.batch_size, device, args.precision, args.threads,
                                       args.workers))
        del time_limit  # frees the model and the features before the per-clip path
        limit = statistics.median(limits)
        middle = statistics.median_low(run["clips_per_s"] for run in runs)  # an actual run
        e2e = dict(next(run for run in runs if run["clips_per_s"] == middle))
        e2e["peak_rss_mb"] = max(run["peak_rss_mb"] for run in runs)
        per_clip = None if args.skip_per_clip else bench_per_clip(model, weights,
                                                                  files[: args.clips], device)
        row = {"limit_clips_per_s": round(limit, 3), "fusefeat": e2e,
               "per_clip_clips_per_s": None if per_clip is None else round(per_clip, 3),
               "ratio_fusefeat_to_limit": round(e2e["clips_per_s"] / limit, 3),
               "repeats": {"limit_clips_per_s": [round(v, 3) for v in limits],
                           "fusefeat_clips_per_s": [run["clips_per_s"] for run in runs],
                           "paired_ratios": [round(run["clips_per_s"] / lim, 3)
                                             for lim, run in zip(limits, runs)]},
               "ratio_fusefeat_to_per_clip": (round(e2e["clips_per_s"] / per_clip, 3)
                                              if per_clip else None)}
        if args.memory_clips:
            big = bench_fusefeat(model, weights, folder, work / f"out-{model}-big",
                                 args.batch_size, device, args.precision, args.threads,
                                 args.workers)
            row["memory"] = {"clips": args.memory_clips, "peak_rss_mb": big["peak_rss_mb"],
                             "ratio_to_small": round(big["peak_rss_mb"] / e2e["peak_rss_mb"], 3),
                             "clips_per_s": big["clips_per_s"]}
        results["models"][model] = row
        print(f"{model:<8} {limit:>9.2f} {e2e['clips_per_s']:>9.2f} "
              f"{per_clip if per_clip else float('nan'):>9.2f} "
              f"{row['ratio_fusefeat_to_limit']:>6.3f} "
              f"{row['ratio_fusefeat_to_per_clip'] or float('nan'):>6.2f} "
              f"{e2e['peak_rss_mb']:>8.0f}", flush=True)
        if args.memory_clips:
            m = row["memory"]
            print(f"{'':<8} peak RSS {m['clips']} clips: {m['peak_rss_mb']:.0f} MB "
                  f"({m['ratio_to_small']:.3f} x the {args.clips}-clip run)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
