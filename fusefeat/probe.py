"""The paper's linear evaluation (EVAR's protocol) on extracted features: `fusefeat probe`.

    feats = fusefeat.load("feats")
    table = read_labels("labels.csv", label_column="label", group_column="speaker")
    data = match(feats.paths, table)                 # the labelled rows of feats
    x = feature_sets(feats, data.rows, layers=[3])["layer 3"]
    result = evaluate(x, data, ProbeSettings(folds=6))   # .mean, .std, .accuracies

Per split: 10% of the training side (stratified by label) is held out for validation; a
StandardScaler is fit on the rest; one linear layer (PyTorch's default initialisation) is trained
with Adam (lr 3e-4, weight decay 1e-8), batches of min(200, n), up to 200 epochs, early stopping
with patience 20 on validation accuracy, the best epoch's weights restored. Between epochs of
equal validation accuracy the lower validation loss is better: without it, a small validation
set that is already right after the first epoch would stop training there. Splits are K folds, stratified by label, or, with groups,
whole groups per fold (a group is never on both sides of a split). Everything is repeated for
several seeds (fold assignment, validation hold-out, initialisation, batch order); accuracy is
reported as mean and standard deviation over all folds x seeds.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from fusefeat.errors import UsageError

PATH_COLUMNS = ("path", "filename")  # tried in this order when --path-column is not given


# ---- labels ----------------------------------------------------------------------------------

@dataclass
class LabelTable:
    paths: list[str]  # as written in the file, normalised
    labels: list[str]
    groups: Optional[list[str]]
    source: str
    path_column: str
    label_column: str
    group_column: Optional[str]
    unlabeled: int = 0  # rows with an empty label (skipped)


def _norm(path: str) -> str:
    path = path.strip().replace("\\", "/")
    while path.startswith("./"):
        path = path[2:]
    return path


def read_labels(path: str | Path, label_column: str = "label", path_column: Optional[str] = None,
                group_column: Optional[str] = None) -> LabelTable:
    """Read a labels CSV. Rows whose label is empty are skipped and counted."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = list(reader.fieldnames or [])
            rows = list(reader)
    except OSError as exc:
        raise UsageError(f"cannot read --labels {path}: {exc.strerror or exc}") from None
    if path_column is None:
        path_column = next((c for c in PATH_COLUMNS if c in columns), None)
        if path_column is None:
            raise UsageError(f"{path} has no 'path' or 'filename' column (columns: {', '.join(columns)})",
                             hint="name the column holding file paths with --path-column")
    for option, column in (("--path-column", path_column), ("--label-column", label_column),
                           ("--group-column", group_column)):
        if column is not None and column not in columns:
            raise UsageError(f"{option} {column!r}: {path} has no such column",
                             hint="columns: " + ", ".join(columns))
    paths, labels, groups, unlabeled = [], [], [] if group_column else None, 0
    seen: dict[str, str] = {}
    for row in rows:
        label = (row.get(label_column) or "").strip()
        if not label:
            unlabeled += 1
            continue
        key = _norm(row.get(path_column) or "")
        if not key:
            raise UsageError(f"{path}: a row with label {label!r} has an empty {path_column!r}")
        if key in seen:
            if seen[key] != label:
                raise UsageError(f"{path} gives {key} two labels ({seen[key]!r} and {label!r})")
            continue
        seen[key] = label
        if group_column:
            group = (row.get(group_column) or "").strip()
            if not group:
                raise UsageError(f"{path}: {key} has no value in the group column {group_column!r}",
                                 hint="every labelled row needs a group (e.g. its speaker)")
            groups.append(group)
        paths.append(key)
        labels.append(label)
    return LabelTable(paths, labels, groups, str(path), path_column, label_column, group_column,
                      unlabeled)


@dataclass
class Matched:
    """The labelled rows of a feature set."""

    rows: np.ndarray  # indices into the features
    labels: np.ndarray  # [n] int class indices
    classes: list[str]
    groups: Optional[np.ndarray]  # [n] int group indices
    report: dict = field(default_factory=dict)
    group_names: list = field(default_factory=list)


def match(feature_paths: Sequence[str], table: LabelTable, failed: Sequence[str] = ()) -> Matched:
    """Pair label rows with feature rows by path: exactly, else by unambiguous path suffix (the
    features store paths relative to the extracted folder, a CSV may be relative to another)."""
    keys = [_norm(p) for p in feature_paths]
    exact = {k: i for i, k in enumerate(keys)}
    by_name: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        by_name.setdefault(k.rsplit("/", 1)[-1], []).append(i)
    rows, labels, groups, missing, ambiguous, suffix = [], [], [], [], [], 0
    used: dict[int, str] = {}
    for j, path in enumerate(table.paths):
        index = exact.get(path)
        if index is None:
            candidates = [i for i in by_name.get(path.rsplit("/", 1)[-1], [])
                          if keys[i].endswith("/" + path) or path.endswith("/" + keys[i])]
            if len(candidates) > 1:
                ambiguous.append(path)
                continue
            index = candidates[0] if candidates else None
            suffix += index is not None
        if index is None:
            missing.append(path)
            continue
        if index in used:
            raise UsageError(f"{table.source}: {used[index]} and {path} both name the features of "
                             f"{feature_paths[index]}", hint="give full paths in the labels file")
        used[index] = path
        rows.append(index)
        labels.append(table.labels[j])
        if table.groups is not None:
            groups.append(table.groups[j])
    if not rows:
        example = table.paths[0] if table.paths else "(no labelled row)"
        raise UsageError(f"no row of {table.source} matches a file in the features "
                         f"(e.g. {example!r}; the features hold paths like {keys[0]!r})" if keys
                         else "the features hold no rows",
                         hint="paths must match as stored (see `fusefeat info`); "
                              "use --path-column for another column")
    classes = sorted(set(labels))
    label_index = {c: i for i, c in enumerate(classes)}
    group_names = sorted(set(groups)) if table.groups is not None else None
    group_index = {g: i for i, g in enumerate(group_names or [])}
    failed_set = {_norm(p) for p in failed}
    report = {
        "labels_file": table.source, "path_column": table.path_column,
        "label_column": table.label_column, "group_column": table.group_column,
        "matched": len(rows), "matched_by_suffix": suffix,
        "rows_without_label": table.unlabeled,
        "labels_without_features": len(missing),
        "labels_without_features_failed": sum(p in failed_set for p in missing),
        "labels_without_features_examples": missing[:5],
        "ambiguous_paths": len(ambiguous), "ambiguous_examples": ambiguous[:5],
        "features_without_labels": len(keys) - len(rows),
        "classes": len(classes), "groups": len(group_names) if group_names else None,
    }
    return Matched(np.array(rows, dtype=np.int64),
                   np.array([label_index[c] for c in labels], dtype=np.int64), classes,
                   np.array([group_index[g] for g in groups], dtype=np.int64)
                   if group_names else None, report, group_names or [])


# ---- splits ------------------------------------------------------------------------------------

def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """Test indices of each of `folds` folds; every class dealt evenly over the folds."""
    rng = np.random.default_rng(seed)
    out: list[list[int]] = [[] for _ in range(folds)]
    start = 0
    for c in np.unique(labels):
        members = rng.permutation(np.nonzero(labels == c)[0])
        for k, index in enumerate(members):
            out[(start + k) % folds].append(int(index))
        start = (start + len(members)) % folds  # the next class continues where this one ended
    return [np.sort(np.array(f, dtype=np.int64)) for f in out]


def group_folds(groups: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """Test indices of each fold; whole groups per fold, folds of similar sizes (the largest
    groups placed first, each into the smallest fold; seeded order among equal sizes)."""
    rng = np.random.default_rng(seed)
    names, sizes = np.unique(groups, return_counts=True)
    order = rng.permutation(len(names))
    order = order[np.argsort(-sizes[order], kind="stable")]
    members: list[list[int]] = [[] for _ in range(folds)]
    totals = np.zeros(folds, dtype=np.int64)
    for g in order:
        k = int(np.argmin(totals))
        members[k].append(int(names[g]))
        totals[k] += sizes[g]
    return [np.sort(np.nonzero(np.isin(groups, m))[0]) for m in members]


def validation_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, validation) positions: `fraction` of each class held out (at least one row)."""
    rng = np.random.default_rng(seed)
    held: list[int] = []
    for c in np.unique(labels):
        members = rng.permutation(np.nonzero(labels == c)[0])
        take = int(round(fraction * len(members)))
        held.extend(members[:take].tolist())
    if not held and len(labels) > 1:
        held = [int(rng.integers(len(labels)))]
    mask = np.zeros(len(labels), dtype=bool)
    mask[held] = True
    return np.nonzero(~mask)[0], np.nonzero(mask)[0]


# ---- the classifier ----------------------------------------------------------------------------

@dataclass
class ProbeSettings:
    folds: int = 5
    seeds: int = 3
    lr: float = 3e-4
    weight_decay: float = 1e-8
    max_epochs: int = 200
    patience: int = 20
    batch_size: int = 200
    val_fraction: float = 0.1


def standardize(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """A StandardScaler fit on `train` (constant dimensions are only centred)."""
    mean = train.mean(axis=0, dtype=np.float64)
    std = train.std(axis=0, dtype=np.float64)
    std[std == 0] = 1.0
    return [((x - mean) / std).astype(np.float32) for x in (train, *others)]


def train_linear(x_fit, y_fit, x_val, y_val, classes: int, seed: int, settings: ProbeSettings):
    """One linear layer; returns (the best-on-validation layer, epochs run, best epoch)."""
    import torch

    with torch.enable_grad():  # whatever the caller's autograd state
        return _train(x_fit, y_fit, x_val, y_val, classes, seed, settings)


def _train(x_fit, y_fit, x_val, y_val, classes: int, seed: int, settings: ProbeSettings):
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layer = torch.nn.Linear(x_fit.shape[1], classes)
    optimizer = torch.optim.Adam(layer.parameters(), lr=settings.lr,
                                 weight_decay=settings.weight_decay)
    xf, yf = torch.from_numpy(x_fit), torch.from_numpy(y_fit)
    xv, yv = torch.from_numpy(x_val), torch.from_numpy(y_val)
    n = len(yf)
    batch = min(settings.batch_size, n)
    best, best_state, best_epoch, waited, epoch = (-1.0, 0.0), None, 0, 0, 0
    for epoch in range(1, settings.max_epochs + 1):
        layer.train()
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch):
            take = order[start:start + batch]
            loss = torch.nn.functional.cross_entropy(layer(xf[take]), yf[take])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            logits = layer(xv)
            accuracy = (logits.argmax(dim=1) == yv).float().mean().item()
            loss = torch.nn.functional.cross_entropy(logits, yv).item()
        score = (accuracy, -loss)  # accuracy first; a tie goes to the lower validation loss
        if score > best:
            best, best_epoch, waited = score, epoch, 0
            best_state = {k: v.clone() for k, v in layer.state_dict().items()}
        else:
            waited += 1
            if waited >= settings.patience:
                break
    layer.load_state_dict(best_state)
    return layer.eval(), epoch, best_epoch


@dataclass
class ProbeResult:
    name: str
    dim: int
    mean: float  # accuracy, 0..1, over folds x seeds
    std: float
    accuracies: list  # [seed][fold]
    seed_means: list
    epochs: list  # best epoch of each run, [seed][fold]

    def to_dict(self) -> dict:
        return asdict(self)


def splits_for(data: Matched, settings: ProbeSettings, seed: int) -> list[np.ndarray]:
    if data.groups is not None:
        count = len(np.unique(data.groups))
        if count < 2:
            raise UsageError("the group column holds a single group: no split can keep it apart")
        return group_folds(data.groups, min(settings.folds, count), seed)
    return stratified_folds(data.labels, settings.folds, seed)


def evaluate(x: np.ndarray, data: Matched, settings: ProbeSettings,
             name: str = "features") -> ProbeResult:
    """Linear evaluation of `x` (rows aligned with `data.labels`) over folds x seeds."""
    import torch

    if settings.folds < 2:
        raise UsageError("--folds must be at least 2")
    if len(data.labels) < 2 * settings.folds:
        raise UsageError(f"{len(data.labels)} labelled rows are too few for {settings.folds} folds")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: threads only add synchronisation
    try:
        accuracies, epochs = _runs(x, data, settings)
    finally:
        torch.set_num_threads(threads)
    flat = np.array([a for row in accuracies for a in row])
    return ProbeResult(name, int(x.shape[1]), float(flat.mean()), float(flat.std()), accuracies,
                       [float(np.mean(r)) for r in accuracies], epochs)


def _runs(x, data: Matched, settings: ProbeSettings):
    import torch

    accuracies, epochs = [], []
    for seed in range(settings.seeds):
        per_fold, per_epoch = [], []
        for k, test in enumerate(splits_for(data, settings, seed)):
            train = np.setdiff1d(np.arange(len(data.labels)), test)
            fit_pos, val_pos = validation_split(data.labels[train], settings.val_fraction,
                                                seed * 1000 + k)
            fit, val = train[fit_pos], train[val_pos]
            x_fit, x_val, x_test = standardize(x[fit], x[val], x[test])
            layer, _, best_epoch = train_linear(x_fit, data.labels[fit], x_val, data.labels[val],
                                                len(data.classes), seed * 1000 + k, settings)
            with torch.no_grad():
                predicted = layer(torch.from_numpy(x_test)).argmax(dim=1).numpy()
            per_fold.append(float((predicted == data.labels[test]).mean()))
            per_epoch.append(best_epoch)
        accuracies.append(per_fold)
        epochs.append(per_epoch)
    return accuracies, epochs


# ---- which vectors ----------------------------------------------------------------------------

def layer_list(numbers: Sequence[int]) -> str:
    """[3, 6] -> "3+6"; three or more consecutive layers -> "0-6"."""
    numbers = list(numbers)
    if len(numbers) > 2 and numbers == list(range(numbers[0], numbers[-1] + 1)):
        return f"{numbers[0]}-{numbers[-1]}"
    return "+".join(map(str, numbers))


def feature_sets(feats, rows: np.ndarray, sweep: bool = False, layers: Sequence[int] = (),
                 baseline: bool = False, combine: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Named matrices to probe, rows in `rows` order. Default: the fused embeddings.

    sweep: every stored layer alone, then the stored fusion (and the baseline if stored);
    combine: extra fusions "3+6" concatenated from stored layers (exactly the fused vector the
    extraction would give: stored layers are pooled after alignment, and fusion concatenates)."""
    stored = sorted(feats.layers)
    layer_names = feats.meta.get("layers") or []

    def stored_layer(n: int) -> np.ndarray:
        if n not in feats.layers:
            raise UsageError(f"layer {n} is not stored in these features (stored: "
                             f"{', '.join(map(str, stored)) or 'none'})",
                             hint="extract with --save-layers (and --layers all for a sweep)")
        return feats.layers[n][rows]  # reads only these rows

    sets: dict[str, np.ndarray] = {}
    if sweep:
        if not stored:
            raise UsageError("--sweep needs features extracted with --save-layers",
                             hint="fusefeat extract ... --layers all --save-layers")
        for n in stored:
            sets[f"layer {n}"] = stored_layer(n)
    for n in layers:
        sets[f"layer {n}"] = stored_layer(n)
    for spec in combine:
        try:
            numbers = [int(t) for t in spec.replace(",", "+").split("+") if t.strip()]
        except ValueError:
            raise UsageError(f"--combine {spec!r}: write layer numbers joined by '+', e.g. 3+6") from None
        sets["fusion " + "+".join(map(str, numbers))] = np.concatenate(
            [stored_layer(n) for n in numbers], axis=1)
    if sweep or not (layers or combine or baseline):
        sets["fusion " + layer_list(layer_names)] = feats.embeddings[rows]
    if baseline or (sweep and feats.baseline is not None):
        if feats.baseline is None:
            raise UsageError("these features hold no baseline", hint="extract with --baseline")
        sets["baseline"] = feats.baseline[rows]
    return sets


# ---- reporting ---------------------------------------------------------------------------------

def render_table(results: Sequence[ProbeResult], data: Matched, settings: ProbeSettings) -> str:
    chance = np.bincount(data.labels).max() / len(data.labels)
    lines = [f"{'features':<22} {'dim':>6}  {'accuracy %':>16}   runs"]
    for r in results:
        lines.append(f"{r.name:<22} {r.dim:>6}  {100 * r.mean:>8.2f} ± {100 * r.std:<5.2f}"
                     f"   {len(r.accuracies) * len(r.accuracies[0])}")
    lines.append(f"(mean ± std over {settings.seeds} seed(s) x folds; majority class "
                 f"{100 * chance:.1f}%, {len(data.classes)} classes, {len(data.labels)} clips)")
    return "\n".join(lines)


def short_model_name(model: Optional[str]) -> str:
    """hf:/a/local/dir/whisper-base-encoder -> hf:whisper-base-encoder (hub ids stay whole)."""
    model = model or "features"
    if model.startswith("hf:") and (model[3:].startswith(("/", ".", "~")) or model.count("/") > 1):
        return "hf:" + model.rstrip("/").rsplit("/", 1)[-1]
    return model


def data_notes(report: dict) -> list[str]:
    """What matching the labels to the features gave, for a person."""
    notes = [f"{report['matched']} labelled clips, {report['classes']} classes"
             + (f", {report['groups']} groups by {report['group_column']}" if report["groups"] else "")]
    if report["rows_without_label"]:
        notes.append(f"{report['rows_without_label']} row(s) of the labels file have no label: skipped")
    if report["labels_without_features"]:
        failed = report["labels_without_features_failed"]
        notes.append(f"{report['labels_without_features']} labelled path(s) have no features"
                     + (f" ({failed} failed extraction)" if failed else "")
                     + ", e.g. " + ", ".join(report["labels_without_features_examples"][:3]))
    if report["ambiguous_paths"]:
        notes.append(f"{report['ambiguous_paths']} labelled path(s) match several feature rows: "
                     "skipped, e.g. " + ", ".join(report["ambiguous_examples"][:3]))
    if report["features_without_labels"]:
        notes.append(f"{report['features_without_labels']} feature row(s) have no label")
    return notes


def write_chart(results: Sequence[ProbeResult], path: str | Path, title: str,
                chance: float) -> None:
    """A bar chart of accuracy (mean, error bars = std) per feature set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.name for r in results]
    means = np.array([100 * r.mean for r in results])
    stds = np.array([100 * r.std for r in results])
    kinds = {"layer": ("#1b9e77", "one layer"), "fusion": ("#d95f02", "fusion"),
             "baseline": ("#7570b3", "baseline")}
    kind_of = [next((k for k in kinds if n.startswith(k)), "layer") for n in names]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(names) + 2), 4.8), dpi=120)
    for kind, (colour, label) in kinds.items():
        where = [i for i, k in enumerate(kind_of) if k == kind]
        if where:
            ax.bar(where, means[where], yerr=stds[where], capsize=4, color=colour,
                   edgecolor="black", linewidth=0.5, label=label)
    for i, (m, s) in enumerate(zip(means, stds)):
        ax.text(i, m + s + 1.5, f"{m:.1f}", ha="center", va="bottom", fontsize=8)
    ax.axhline(100 * chance, color="grey", linestyle="--", linewidth=1, label="majority class")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("accuracy % (mean ± std)")
    ax.set_ylim(0, 115)
    ax.legend(loc="lower left", fontsize=8, framealpha=0.9)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_probe(features: str, labels: str, label_column: str = "label",
              path_column: Optional[str] = None, group_column: Optional[str] = None,
              settings: Optional[ProbeSettings] = None, sweep: bool = False,
              layers: Sequence[int] = (), baseline: bool = False, combine: Sequence[str] = (),
              json_out: Optional[str] = None, chart: Optional[str] = None,
              task: Optional[str] = None, log=None, progress=None) -> dict:
    """The whole `fusefeat probe`: load, match, evaluate each feature set, write JSON (+ chart)."""
    from fusefeat.store.reader import load

    settings = settings or ProbeSettings()
    feats = load(features)
    try:
        table = read_labels(labels, label_column, path_column, group_column)
        data = match(feats.paths, table, failed=[e.path for e in feats.errors])
        if len(data.classes) < 2:
            raise UsageError(f"the labelled rows hold a single class ({data.classes[0]!r})")
        sets = feature_sets(feats, data.rows, sweep, layers, baseline, combine)
        meta = {"model": feats.meta.get("model"), "layers": feats.meta.get("layers"),
                "weights_id": feats.meta.get("weights_id")}
    finally:
        feats.close()
    log = log or (lambda line: None)
    for note in data_notes(data.report):
        log(note)
    splits = [[sorted({data.group_names[g] for g in data.groups[test]}) if data.groups is not None
               else len(test) for test in splits_for(data, settings, seed)]
              for seed in range(settings.seeds)]
    results = []
    for name, x in sets.items():
        results.append(evaluate(x, data, settings, name))
        if progress:
            progress(results[-1])
    for line in render_table(results, data, settings).splitlines():
        log(line)
    task = task or label_column + (f" (groups by {group_column} kept apart)" if group_column else "")
    chance = float(np.bincount(data.labels).max() / len(data.labels))
    report = {"features": str(features), "task": task, "meta": meta, "data": data.report,
              "classes": data.classes, "settings": asdict(settings), "majority_class": chance,
              # per seed, per fold: the groups tested (trained on all others), or the test size
              "test_folds": splits,
              "results": [r.to_dict() for r in results]}
    if json_out:
        Path(json_out).write_text(json.dumps(report, indent=1))
        report["json"] = str(json_out)
    if chart:
        folds = len(results[0].accuracies[0])
        write_chart(results, chart, f"{short_model_name(meta['model'])}: {task}\nlinear probe, "
                    f"{folds} folds x {settings.seeds} seeds, {len(data.labels)} clips", chance)
        report["chart"] = str(chart)
    return report
