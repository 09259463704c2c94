"""The command line: a thin layer over the library (fusefeat.extract, fusefeat.load, ...).

Logs and progress go to stderr; machine-readable results (the JSON summary) go to stdout.
Heavy modules are imported inside the commands so that `fusefeat --help` starts fast.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import click

from fusefeat import __version__
from fusefeat.errors import EXIT_CODES_HELP, FusefeatError, WriteError

MODELS_HELP = "vggish, cnn14, ast, yamnet, or hf:ID_OR_PATH (any Hugging Face audio encoder)"


def _friendly(func):
    """Expected failures: one clear message on stderr and a documented exit code."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except FusefeatError as exc:
            click.echo(f"fusefeat: error: {exc.message}", err=True)
            if exc.hint:
                click.echo(f"  hint: {exc.hint}", err=True)
            if isinstance(exc, WriteError) and exc.hdf5_failed:
                # A write that failed inside HDF5 (fusefeat checks for room first, but an I/O
                # error or a quota can still strike) leaves HDF5 objects that can crash the
                # interpreter at exit and turn exit code 1 into a segfault. Committed shards are
                # durable and the open one is removed: end the process here.
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(exc.exit_code)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("fusefeat: interrupted", err=True)
            sys.exit(130)

    return wrapper


class _Shard(click.ParamType):
    name = "I/N"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            part, parts = (int(x) for x in str(value).split("/"))
        except ValueError:
            self.fail(f"{value!r} is not I/N (e.g. 0/8: the first of 8 parts)", param, ctx)
        if parts < 1 or not 0 <= part < parts:
            self.fail(f"{value!r}: I must be in 0..N-1", param, ctx)
        return part, parts


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="fusefeat")
def main():
    """Audio embeddings that fuse a middle and a late layer of a pre-trained model
    (Niizumi et al., EUSIPCO 2022), for whole corpora."""


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("inputs", nargs=-1, type=click.Path())
@click.option("--model", "-m", help=f"Backbone: {MODELS_HELP}.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="A preset file (TOML, like configs/*.toml) instead of --model.")
@click.option("--layers", "-l", help="Layers to fuse, e.g. 6,12 or -2,-1 or 3..6 or all "
              "(default: the paper's pair; see `fusefeat layers`).")
@click.option("--weights", "-w", type=click.Path(),
              help="Local weights (official format: .pth file, or Hugging Face directory). "
              "Default: the official download, cached in TORCH_HOME / HF_HOME.")
@click.option("--out", "-o", default="fusefeat_out", show_default=True, type=click.Path(),
              help="Output directory (HDF5 shards + manifest); resumes if it exists.")
@click.option("--files-from", type=click.Path(allow_dash=True),
              help="Read input paths from FILE, one per line ('-' for stdin).")
@click.option("--null", "-0", "null_separated", is_flag=True,
              help="With --files-from: paths are NUL-separated (find -print0), the only way to "
              "list names that hold newlines.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--devices", help="Several devices, one worker process each, e.g. cuda:0,cuda:1 "
              "(or all: every visible GPU). Overrides --device.")
@click.option("--batch-size", "-b", default=16, show_default=True, type=int,
              help="Clips (or windows) per batch at most.")
@click.option("--batch-seconds", default=320.0, show_default=True, type=float,
              help="Audio per batch at most, in seconds: batches of long clips hold fewer clips.")
@click.option("--num-workers", "-j", default=2, show_default=True, type=int,
              help="Decoding processes (0: decode in the main process).")
@click.option("--clip-seconds", type=float,
              help="Crop or zero-pad every clip at its end to exactly S seconds.")
@click.option("--window-seconds", type=float,
              help="Window length for clips longer than two windows (default: the preset's).")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32",
              show_default=True,
              help="Autocast precision of the network: fp32, bf16 (CUDA or CPU), fp16 (CUDA).")
@click.option("--save-layers", is_flag=True, help="Also store each layer's own vector (layers/<n>).")
@click.option("--baseline", is_flag=True, help="Also store the model's original embedding (baseline).")
@click.option("--save-frames", is_flag=True, help="Also store the fused frames before pooling.")
@click.option("--shard-size", default=1000, show_default=True, type=int,
              help="Clips per HDF5 shard; a shard is committed when full.")
@click.option("--commit-seconds", default=600.0, show_default=True, type=float,
              help="Commit the open shard at least this often.")
@click.option("--shard", "shard", type=_Shard(),
              help="Process only part I of N (0-based). Default under a SLURM array: I = "
              "(SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP, "
              "N = SLURM_ARRAY_TASK_COUNT.")
@click.option("--overwrite", is_flag=True, help="Delete features already in --out first.")
@click.option("--retry-failed", is_flag=True, help="Extract again the files recorded as failed.")
@click.option("--refresh-changed", is_flag=True,
              help="Extract again the files whose size or mtime changed since they were committed.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@_friendly
def extract(inputs, files_from, null_separated, quiet, config_file, **options):
    """Extract fused vectors for every audio file in INPUTS (directories are walked).

    \b
    Examples:
      fusefeat extract ./wavs --model cnn14
      fusefeat extract ./wavs --model ast --layers 6,12 --out feats/
      find /data -name '*.flac' | fusefeat extract --files-from - --model vggish
    """
    from fusefeat.allocator import reuse_freed_memory
    from fusefeat.errors import UsageError
    from fusefeat.pipeline import ExtractOptions, extract as run

    reuse_freed_memory()  # this process is ours: large tensors are reused, not re-faulted
    if not inputs and files_from is None:
        raise UsageError("no input", hint="name directories or files, or use --files-from FILE (or -)")
    if options["shard"] is None:
        options["shard"] = _slurm_shard(options["out"])
    opts = ExtractOptions(config_file=config_file, progress=not quiet, **options)
    summary = run(list(inputs), opts, files_from=files_from, null_separated=null_separated)
    click.echo(summary.to_json())
    if summary.status == "interrupted":
        click.echo(f"fusefeat: interrupted with {summary.pending} file(s) pending; run the same "
                   "command again to resume", err=True)
    elif summary.failed_total:
        click.echo(f"fusefeat: {summary.failed_total} file(s) failed; see `fusefeat info "
                   f"{summary.output}`, and --retry-failed", err=True)
    sys.exit(summary.exit_code)


def _slurm_shard(out: str):
    """--shard from a SLURM job array's variables (None outside an array).

    I = (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP and
    N = SLURM_ARRAY_TASK_COUNT: right for the array as first submitted (--array=0-99, 1-100,
    0-198:2). A resubmission of some indices only (--array=3,7) has other MIN and COUNT: that
    is why the template passes --shard explicitly, and why a split that disagrees with the
    one the output directory already records is refused here."""
    import os

    from fusefeat.errors import UsageError

    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    if task is None:
        return None
    count = os.environ.get("SLURM_ARRAY_TASK_COUNT")
    if count is None:
        raise UsageError("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not "
                         "(an old SLURM?)",
                         hint="pass --shard I/N explicitly, e.g. --shard $SLURM_ARRAY_TASK_ID/N")
    try:
        first = int(os.environ.get("SLURM_ARRAY_TASK_MIN") or 0)
        step = int(os.environ.get("SLURM_ARRAY_TASK_STEP") or 1) or 1
        part, parts = (int(task) - first) // step, int(count)
    except ValueError:
        raise UsageError("the SLURM_ARRAY_TASK_* variables are not numbers",
                         hint="pass --shard I/N explicitly") from None
    if not 0 <= part < parts or (int(task) - first) % step:
        raise UsageError(f"SLURM_ARRAY_TASK_ID={task} is not task I of a regular array of "
                         f"{parts} (MIN={first}, STEP={step})",
                         hint="pass --shard I/N explicitly")
    from fusefeat.store.status import recorded_splits

    other = sorted(n for n in recorded_splits(out) if n > 1 and n != parts) if os.path.isdir(out) else []
    if other:
        raise UsageError(
            f"this array has {parts} task(s) (SLURM_ARRAY_TASK_COUNT) but {out} was split into "
            f"{other[0]} parts: a resubmission of some indices only?",
            hint=f"pass --shard $SLURM_ARRAY_TASK_ID/{other[0]} (scripts/slurm/"
                 "extract_array.sbatch does), or use another --out")
    click.echo(f"fusefeat: SLURM array task {task}: --shard {part}/{parts}", err=True)
    return part, parts


@main.command()
@click.option("--model", "-m", help=f"Backbone: {MODELS_HELP}.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="A preset file.")
@click.option("--weights", "-w", type=click.Path(), help="Local weights (needed for hf: models "
              "only to read their configuration).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_friendly
def layers(model, config_file, weights, as_json):
    """List the layers a backbone offers to --layers, with the default pair marked."""
    from fusefeat.pipeline import ExtractOptions, plan_layers

    preset, cls, table, default = plan_layers(ExtractOptions(model=model, config_file=config_file,
                                                              weights=weights))
    hop_ms = 1000.0 * _hop_samples(preset) / preset.sample_rate
    rows = [{"number": i.number, "module": i.module, "kind": i.kind, "shape_1s": list(i.shape_1s),
             "frame_dim": i.frame_dim,
             "stride_ms": round(i.time_stride * hop_ms, 3) if i.time_stride else None,
             "default": i.number in default} for i in table]
    if as_json:
        click.echo(json.dumps({"model": preset.name, "layers": rows,
                               "default": list(default)}))
        return
    click.echo(f"{preset.name}: {preset.description}")
    click.echo(f"{'layer':>6}  {'module':<22} {'shape (1 s clip)':<20} {'frame dim':>9}  stride")
    for r in rows:
        stride = f"{r['stride_ms']:g} ms" if r["stride_ms"] else "per clip"
        mark = "  <- default" if r["default"] else ""
        shape = " x ".join(str(x) for x in r["shape_1s"])
        click.echo(f"{r['number']:>6}  {r['module']:<22} {shape:<20} {r['frame_dim']:>9}  {stride}{mark}")
    fused = sum(r["frame_dim"] for r in rows if r["default"])
    click.echo(f"default fusion: layers {','.join(str(n) for n in default)} -> {fused}-d")


def _hop_samples(preset) -> int:
    fe = preset.frontend
    if "hop_size" in fe:
        return int(fe["hop_size"])
    if "hop_length_s" in fe:
        return int(round(preset.sample_rate * float(fe["hop_length_s"])))
    if "frame_shift_ms" in fe:
        return int(preset.sample_rate * float(fe["frame_shift_ms"]) / 1000)
    return int(fe.get("hop_samples", 160))


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_friendly
def info(directory, as_json):
    """Summarise an output directory: files committed, failed (grouped by stage and type, with
    examples and messages; --json lists every failure), flagged, pending, changed."""
    from fusefeat.store.info import describe, render

    report = describe(directory)
    click.echo(json.dumps(report, sort_keys=True) if as_json else render(report))


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--shards", "parts", type=click.IntRange(min=1),
              help="N of --shard I/N (the array size); default: the split DIRECTORY records.")
@click.option("--script", default="scripts/slurm/extract_array.sbatch", show_default=True,
              help="The batch script named in the resubmission command.")
@click.option("--all", "show_all", is_flag=True, default=None,
              help="List every part (default: all up to 32 parts, else the unfinished ones).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_friendly
def status(directory, parts, script, show_all, as_json):
    """Which parts of a split run (--shard I/N, a SLURM array) are complete, running, partial,
    failed or missing, and the sbatch command that resubmits just the unfinished ones."""
    from fusefeat.store.status import part_status, render

    report = part_status(directory, parts=parts, script=script)
    click.echo(json.dumps(report, sort_keys=True) if as_json else render(report, show_all))


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False),
              help="The merged HDF5 file to write.")
@click.option("--virtual", is_flag=True,
              help="Build an HDF5 virtual dataset over the shards instead of copying vectors.")
@_friendly
def merge(directory, output, virtual):
    """Consolidate the shards of DIRECTORY into one HDF5 file (rows sorted by path)."""
    from fusefeat.store.merge import merge as run

    result = run(directory, output, virtual=virtual)
    click.echo(json.dumps(result, sort_keys=True))


@main.command()
@click.argument("features", type=click.Path(exists=True))
@click.option("--labels", required=True, type=click.Path(exists=True, dir_okay=False),
              help="CSV with a path column (path or filename; see --path-column) and labels.")
@click.option("--label-column", default="label", show_default=True, help="The column to predict.")
@click.option("--path-column", help="The column of file paths (default: 'path', else 'filename'), "
              "matched to the paths stored in FEATURES.")
@click.option("--group-column", help="Keep each value of this column (e.g. a speaker) on one side "
              "of every split: whole groups per fold.")
@click.option("--folds", default=5, show_default=True, type=int,
              help="Number of folds (stratified by label; with --group-column, groups per fold, "
              "at most one fold per group).")
@click.option("--seeds", default=3, show_default=True, type=int,
              help="Repetitions with different seeds (folds, validation hold-out, initialisation).")
@click.option("--sweep", is_flag=True, help="Probe every layer stored with --save-layers alone, "
              "and the fusion; write a bar chart (--chart).")
@click.option("--combine", multiple=True, metavar="A+B",
              help="Also probe this fusion of stored layers, e.g. 3+6 (repeatable).")
@click.option("--layer", "layers", type=int, multiple=True,
              help="Probe this stored layer (repeatable) instead of the fused embedding.")
@click.option("--baseline", is_flag=True, help="Probe the stored baseline embedding too.")
@click.option("--json-out", type=click.Path(dir_okay=False),
              help="Where to write the results (default: probe_<label column>.json).")
@click.option("--chart", type=click.Path(dir_okay=False),
              help="PNG bar chart (default with --sweep: probe_<label column>.png).")
@click.option("--task", help="Task name for the chart title (default: the label column).")
@click.option("--epochs", default=200, show_default=True, type=int, help="Epochs at most.")
@click.option("--patience", default=20, show_default=True, type=int,
              help="Early stopping: epochs without a better validation accuracy.")
@_friendly
def probe(features, labels, label_column, path_column, group_column, folds, seeds, sweep, combine,
          layers, baseline, json_out, chart, task, epochs, patience):
    """Linear evaluation of extracted FEATURES (the paper's protocol): StandardScaler, one linear
    layer (Adam, lr 3e-4), early stopping on 10% of train; mean ± std over folds x seeds.

    \b
    Examples:
      fusefeat probe feats/ --labels labels.csv --folds 5
      fusefeat probe feats/ --labels labels.csv --group-column speaker --folds 6 --sweep
    """
    from fusefeat.errors import UsageError
    from fusefeat.probe import ProbeSettings, run_probe

    if seeds < 1 or epochs < 1 or patience < 1:
        raise UsageError("--seeds, --epochs and --patience must be at least 1")
    settings = ProbeSettings(folds=folds, seeds=seeds, max_epochs=epochs, patience=patience)
    json_out = json_out or f"probe_{label_column}.json"
    if sweep and chart is None:
        chart = f"probe_{label_column}.png"
    report = run_probe(features, labels, label_column, path_column, group_column, settings,
                       sweep=sweep, layers=layers, baseline=baseline, combine=combine,
                       json_out=json_out, chart=chart, task=task, log=click.echo,
                       progress=lambda r: click.echo(f"fusefeat: {r.name}: {100 * r.mean:.1f}% "
                                                     f"± {100 * r.std:.1f}", err=True))
    click.echo(f"results: {report['json']}" + (f", chart: {report['chart']}" if chart else ""))

