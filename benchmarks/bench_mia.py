#!/usr/bin/env python
"""Benchmark: RMIA with 1, 2, 4 reference models vs LiRA (online) with 4, 8, 16.

Target: a non-private model on a Fashion-MNIST subset. Reports AUC, TPR at
0.1% and 1% FPR (bootstrap CIs) and cost (reference models trained, their
training time, attack wall time) and writes ``benchmarks/results/mia.json``
and ``mia.md``.

Data design (sizes for ``--quick``; full mode is 4x larger):

* members (the target's training set): 2,500;
* non-members: 1,500; population z (for RMIA): 1,000;
* online reference models train on a random half of members + non-members +
  z = 2,500 samples, the target's training-set size; models come in
  complementary pairs, so 4, 8, 16 models are prefixes of one set of 16;
* offline reference models (RMIA offline) train on 2,500 of a separate
  5,000-sample auditor pool that never meets the audit samples or z;
  1, 2, 4 models are prefixes of one set of 4.

Usage::

    python benchmarks/bench_mia.py --quick            # MLP, ~ a few minutes on 2 CPU cores
    python benchmarks/bench_mia.py                    # CNN, 4x data (long on CPU; use --device cuda)

Published anchor (CIFAR-10, Carlini et al. 2022): LiRA online, 16 shadow
models, AUC 0.686, TPR@0.1%FPR 5.9%. Numbers here are for a different data
set and model and are not directly comparable.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from secure_dfml import audit

LOG = logging.getLogger("bench_mia")
HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "fashion-mnist"
MEAN, STD = 0.2860, 0.3530


def read_idx(path: Path) -> np.ndarray:
    """Read an idx(.gz) file (images: magic 2051, labels: magic 2049)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[:4], "big")
    if magic == 2051:
        n, rows, cols = (int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(3))
        return np.frombuffer(raw, np.uint8, offset=16).reshape(n, rows, cols)
    if magic == 2049:
        n = int.from_bytes(raw[4:8], "big")
        return np.frombuffer(raw, np.uint8, offset=8)[:n]
    raise SystemExit(f"{path}: not an idx file (magic {magic})")


def load_fashion_mnist(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    files = {k: folder / f"{k}-ubyte.gz" for k in
             ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise SystemExit(
            f"Fashion-MNIST idx files missing: {', '.join(missing)}. Pass --data FOLDER, or install the "
            "Debian package dataset-fashion-mnist (files in /usr/share/datasets/fashion-mnist/)."
        )
    def norm(a: np.ndarray) -> np.ndarray:
        return ((a.astype(np.float32) / 255.0 - MEAN) / STD)[:, None, :, :]
    return (norm(read_idx(files["train-images-idx3"])), read_idx(files["train-labels-idx1"]).astype(np.int64),
            norm(read_idx(files["t10k-images-idx3"])), read_idx(files["t10k-labels-idx1"]).astype(np.int64))


def make_factory(kind: str) -> audit.ModelFactory:
    def mlp(rng: np.random.Generator) -> torch.nn.Module:
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 256), torch.nn.ReLU(),
                                  torch.nn.Linear(256, 10))
        return audit.reinit_parameters(net, rng)

    def cnn(rng: np.random.Generator) -> torch.nn.Module:
        net = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Flatten(), torch.nn.Linear(32 * 7 * 7, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10),
        )
        return audit.reinit_parameters(net, rng)

    return {"mlp": mlp, "cnn": cnn}[kind]


def on_device(train_fn: audit.TrainFn, device: str) -> audit.TrainFn:
    if device == "cpu":
        return train_fn

    def train(model: torch.nn.Module, x: Any, y: Any, rng: np.random.Generator) -> torch.nn.Module:
        model = train_fn(model.to(device), torch.as_tensor(x).to(device), torch.as_tensor(y).to(device), rng)
        return model.to("cpu")

    return train


def fmt_ci(est: audit.Estimate, pct: bool = False) -> str:
    if est.value is None:
        return "n/a"
    if pct:
        return f"{100 * est.value:.2f}% [{100 * est.ci_low:.2f}, {100 * est.ci_high:.2f}]"
    return f"{est.value:.3f} [{est.ci_low:.3f}, {est.ci_high:.3f}]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small run (MLP, 2.5k members) for 2 CPU cores")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with the Fashion-MNIST idx .gz files")
    ap.add_argument("--model", choices=["mlp", "cnn"], default=None, help="default: mlp with --quick, else cnn")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for small models)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bootstrap", type=int, default=500)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)

    scale = 1 if args.quick else 4
    model_kind = args.model or ("mlp" if args.quick else "cnn")
    epochs = args.epochs or (40 if model_kind == "mlp" else 30)
    n_mem, n_non, n_pop, n_pool = 2500 * scale, 1500 * scale, 1000 * scale, 5000 * scale
    lira_ks, rmia_off_ks, rmia_on_ks = (4, 8, 16), (1, 2, 4), (2, 4)

    x_all, y_all, x_test, y_test = load_fashion_mnist(args.data)
    rng = np.random.default_rng(args.seed)
    perm = rng.permutation(len(x_all))
    cuts = np.cumsum([n_mem, n_non, n_pop, n_pool])
    if cuts[-1] > len(x_all):
        raise SystemExit(f"need {cuts[-1]} training images, have {len(x_all)}")
    i_mem, i_non, i_pop, i_pool = np.split(perm[: cuts[-1]], cuts[:-1])
    xm, ym, xn, yn = x_all[i_mem], y_all[i_mem], x_all[i_non], y_all[i_non]
    xz, yz, xp, yp = x_all[i_pop], y_all[i_pop], x_all[i_pool], y_all[i_pool]

    factory = make_factory(model_kind)
    train = on_device(audit.make_trainer(epochs=epochs, lr=1e-3, batch_size=64), args.device)
    t0 = time.perf_counter()
    target = train(factory(rng), xm, ym, rng)
    target_s = time.perf_counter() - t0

    def acc(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
        return float(audit.compute_signals(model, x, y).correct.mean())

    train_acc, test_acc = acc(target, xm, ym), acc(target, x_test, y_test)
    LOG.info("target %s: %d epochs, train acc %.3f, test acc %.3f, %.1fs", model_kind, epochs, train_acc, test_acc,
             target_s)

    def progress(tag: str):  # noqa: ANN202
        return lambda done, total: LOG.info("%s reference models: %d/%d", tag, done, total)

    online = audit.train_reference_models(
        model_factory=factory, train_fn=train, pool_x=xp, pool_y=yp, k=max(lira_ks), rng=rng,
        challenge_x=np.concatenate([xm, xn, xz]), challenge_y=np.concatenate([ym, yn, yz]),
        train_size=n_mem, progress=progress("online"),
    )
    offline = audit.train_reference_models(
        model_factory=factory, train_fn=train, pool_x=xp, pool_y=yp, k=max(rmia_off_ks), rng=rng,
        train_size=n_mem, progress=progress("offline"),
    )

    runs: list[tuple[str, str, int, audit.ReferenceModels | None]] = [("loss", "loss", 0, None)]
    runs += [("RMIA offline", "rmia_offline", k, offline.subset(k)) for k in rmia_off_ks]
    runs += [("RMIA online", "rmia_online", k, online.subset(k)) for k in rmia_on_ks]
    runs += [("LiRA online", "lira_online", k, online.subset(k)) for k in lira_ks]
    rows: list[dict[str, Any]] = []
    for label, attack, k, ref in runs:
        t0 = time.perf_counter()
        res = audit.audit_model(
            target, x_members=xm, y_members=ym, x_nonmembers=xn, y_nonmembers=yn, pool_x=xp, pool_y=yp,
            rng=np.random.default_rng([args.seed, k, len(rows)]), attacks=(attack,), reference=ref,
            population=(xz, yz), n_bootstrap=args.bootstrap,
        )
        audit_s = time.perf_counter() - t0
        r = res.results[attack]
        train_s = float(sum(ref.train_seconds)) if ref is not None else 0.0
        row = {
            "attack": label, "name": attack, "reference_models": k,
            "auc": r.metrics.auc.to_dict(),
            "tpr_at_0.1%_fpr": r.metrics.tpr_at_fpr[0.001].to_dict(),
            "tpr_at_1%_fpr": r.metrics.tpr_at_fpr[0.01].to_dict(),
            "reference_train_s": round(train_s, 2), "attack_s": round(audit_s, 2),
            "total_s": round(train_s + audit_s, 2), "details": dict(r.details),
        }
        rows.append(row)
        LOG.info("%-13s k=%-2d AUC %s  TPR@0.1%% %s  TPR@1%% %s  cost %.1fs", label, k, fmt_ci(r.metrics.auc),
                 fmt_ci(r.metrics.tpr_at_fpr[0.001], True), fmt_ci(r.metrics.tpr_at_fpr[0.01], True),
                 train_s + audit_s)

    lira16 = next(r for r in rows if r["name"] == "lira_online" and r["reference_models"] == 16)
    rmia2 = [r for r in rows if r["name"].startswith("rmia") and r["reference_models"] == 2]
    verdicts = []
    for r in rmia2:
        ok_auc = r["auc"]["value"] >= lira16["auc"]["value"]
        ratio = r["total_s"] / lira16["total_s"]
        verdicts.append({"attack": r["attack"], "auc_at_least_lira16": ok_auc, "cost_ratio_vs_lira16": round(ratio, 3),
                         "quarter_cost_or_less": ratio <= 0.25})

    meta = {
        "mode": "quick" if args.quick else "full", "model": model_kind, "epochs": epochs, "seed": args.seed,
        "n_members": n_mem, "n_nonmembers": n_non, "n_population": n_pop, "n_auditor_pool": n_pool,
        "target_train_acc": train_acc, "target_test_acc": test_acc, "target_train_s": round(target_s, 2),
        "device": args.device, "torch_threads": args.threads, "bootstrap": args.bootstrap,
        "python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
        "command": " ".join(["python", "benchmarks/bench_mia.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mia.json").write_text(json.dumps({"meta": meta, "rows": rows, "target_check": verdicts}, indent=2))

    lines = [
        f"# Membership inference: RMIA vs LiRA ({meta['mode']} mode)",
        "",
        f"Fashion-MNIST, {model_kind.upper()} trained for {epochs} epochs on {n_mem} members "
        f"(train acc {train_acc:.3f}, test acc {test_acc:.3f}); {n_non} non-members; "
        f"{n_pop} population samples; {n_pool}-sample auditor pool. Bootstrap 95% CIs ({args.bootstrap} resamples). "
        f"Cost = training of the reference models the attack uses + the attack itself (signals, scoring, metrics), "
        f"{args.device}, {args.threads} torch thread(s).",
        "",
        "| attack | ref. models | AUC [95% CI] | TPR@0.1%FPR [CI] | TPR@1%FPR [CI] | cost (s) |",
        "|---|---:|---|---|---|---:|",
    ]
    for r in rows:
        e = lambda d, pct=False: fmt_ci(audit.Estimate(d["value"], d["ci_low"], d["ci_high"], d["reason"]), pct)  # noqa: E731
        lines.append(f"| {r['attack']} | {r['reference_models']} | {e(r['auc'])} | {e(r['tpr_at_0.1%_fpr'], True)} | "
                     f"{e(r['tpr_at_1%_fpr'], True)} | {r['total_s']:.1f} |")
    lines += ["", "Target check (RMIA with 2 reference models vs LiRA online with 16):", ""]
    for v in verdicts:
        lines.append(f"- {v['attack']}: AUC at least LiRA-16's: {'yes' if v['auc_at_least_lira16'] else 'no'}; "
                     f"cost ratio {v['cost_ratio_vs_lira16']:.3f} ({'<=' if v['quarter_cost_or_less'] else '>'} 1/4).")
    lines += ["", "Published anchor (CIFAR-10, different data and model): LiRA online, 16 shadow models, "
              "AUC 0.686, TPR@0.1%FPR 5.9%.", "", f"Command: `{meta['command']}`", ""]
    (args.out / "mia.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
