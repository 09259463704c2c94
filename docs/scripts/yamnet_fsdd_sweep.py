"""STAND-IN for `fusefeat probe --sweep` (not part of the fusefeat package): the YAMNet layer
sweep on FSDD behind docs/yamnet.md, written while the probe command was not on main.

It follows the paper's linear evaluation (EVAR): StandardScaler fit on train; one linear layer;
Adam lr 3e-4, weight decay 1e-8; batch min(200, n); up to 200 epochs; early stopping (patience 20)
on the accuracy of a 10% validation split of train (random, seed 0); best weights restored.
  digits:   leave-one-speaker-out, 6 folds (a speaker is never on both sides)
  speakers: 5 folds by utterance index (0-9, 10-19, ...; every digit of every speaker in each)
One seed per fold; accuracy is the mean (and std) over folds.

    fusefeat extract FSDD/wav --model yamnet --layers all --save-layers --baseline --out all
    python docs/scripts/yamnet_fsdd_sweep.py all FSDD/labels.csv sweep.json \
        --pairs 6+14 5+14 7+14 4+14 9+14 --chart docs/img/yamnet_fsdd_sweep.png
"""
import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import torch

import fusefeat


def linear_eval(xtr, ytr, xte, yte, seed=0):
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(xtr))
    nval = max(1, len(xtr) // 10)
    val, tr = order[:nval], order[nval:]
    mean, std = xtr[tr].mean(0), xtr[tr].std(0)
    std[std == 0] = 1.0

    def scale(x):
        return torch.from_numpy(((x - mean) / std).astype(np.float32))

    Xtr, Xva, Xte = scale(xtr[tr]), scale(xtr[val]), scale(xte)
    Ytr, Yva, Yte = (torch.from_numpy(y) for y in (ytr[tr], ytr[val], yte))
    torch.manual_seed(seed)
    classes = int(max(ytr.max(), yte.max())) + 1
    model = torch.nn.Linear(Xtr.shape[1], classes)
    opt = torch.optim.Adam(model.parameters(), lr=3e-4, weight_decay=1e-8)
    bs = min(200, len(Xtr))
    best, best_state, wait = -1.0, None, 0
    for _ in range(200):
        model.train()
        perm = torch.randperm(len(Xtr))
        for i in range(0, len(Xtr), bs):
            idx = perm[i:i + bs]
            loss = torch.nn.functional.cross_entropy(model(Xtr[idx]), Ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = (model(Xva).argmax(1) == Yva).float().mean().item()
        if acc > best:
            best, best_state, wait = acc, {k: v.clone() for k, v in model.state_dict().items()}, 0
        else:
            wait += 1
            if wait >= 20:
                break
    model.load_state_dict(best_state)
    with torch.no_grad():
        return (model(Xte).argmax(1) == Yte).float().mean().item()


def chart(results, pair, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    titles = {"digits": "Digit recognition (leave-one-speaker-out, 6 folds)",
              "speakers": "Speaker identification (5 folds by utterance index)"}
    blocks = sorted(int(k.split()[1]) for k in results if k.startswith("block "))
    for ax, task in zip(axes, ("digits", "speakers")):
        x = np.array(blocks)
        m = [np.mean(results[f"block {n}"][task]) for n in x]
        s = [np.std(results[f"block {n}"][task]) for n in x]
        ax.errorbar(x, m, yerr=s, marker="o", capsize=3,
                    label="each block alone (2048-d; block 1: 1024-d)")
        f = np.mean(results[f"fusion {pair}"][task])
        e = np.mean(results["embedding (1024-d)"][task])
        dim = results[f"fusion {pair}"]["dim"]
        ax.axhline(f, color="tab:green", ls="--", label=f"default fusion {pair} ({dim}-d): {f:.1f}")
        ax.axhline(e, color="tab:red", ls=":", label=f"YAMNet embedding (1024-d): {e:.1f}")
        ax.set_title(titles[task], fontsize=10)
        ax.set_xlabel("YAMNet block")
        ax.set_xticks(x)
        ax.set_ylabel("accuracy %")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left" if task == "digits" else "center left")
        if task == "digits":
            ax.set_ylim(10, 100)
    fig.suptitle("YAMNet on FSDD (3000 clips), linear evaluation: mean ± std over folds",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("features")
    parser.add_argument("labels")
    parser.add_argument("out_json")
    parser.add_argument("--pairs", nargs="*", default=[], help="fusions to add, e.g. 6+14")
    parser.add_argument("--chart", help="PNG to draw (the first pair is the default fusion)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    feats = fusefeat.load(args.features)
    rows = {r["filename"]: r for r in csv.DictReader(open(args.labels))}
    meta = [rows["wav/" + Path(p).name] for p in feats.paths]
    digit = np.array([int(m["label"]) for m in meta])
    speakers = sorted({m["speaker"] for m in meta})
    speaker = np.array([speakers.index(m["speaker"]) for m in meta])
    index = np.array([int(m["index"]) for m in meta])
    layers = {n: np.asarray(feats.layers[n]) for n in sorted(feats.layers)}
    reps = {f"block {n}": x for n, x in layers.items()}
    for pair in args.pairs:
        reps[f"fusion {pair}"] = np.concatenate([layers[int(n)] for n in pair.split("+")], 1)
    reps["embedding (1024-d)"] = np.asarray(feats.baseline)
    tasks = {"digits": (digit, [speaker == s for s in range(len(speakers))]),
             "speakers": (speaker, [(index // 10) == k for k in range(5)])}
    results = {}
    print("| representation | dim | digits % | speakers % |\n|---|---|---|---|")
    for name, x in reps.items():
        started = time.time()
        results[name] = {"dim": int(x.shape[1])}
        for task, (y, folds) in tasks.items():
            results[name][task] = [round(100 * linear_eval(x[~te], y[~te], x[te], y[te]), 2)
                                   for te in folds]
        d, s = results[name]["digits"], results[name]["speakers"]
        print(f"| {name} | {x.shape[1]} | {np.mean(d):.1f} ± {np.std(d):.1f} | "
              f"{np.mean(s):.1f} ± {np.std(s):.1f} |   <!-- {time.time() - started:.0f} s -->",
              flush=True)
        with open(args.out_json, "w") as handle:
            json.dump(results, handle, indent=1)
    if args.chart and args.pairs:
        chart(results, args.pairs[0], args.chart)


if __name__ == "__main__":
    main()
