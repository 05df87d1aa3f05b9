"""DP utility benchmark (issue 5): DFML global accuracy at epsilon 1, 2, 4, 8 and non-private.

Fashion-MNIST, 10 peers, Dirichlet(0.5) non-IID split, heterogeneous models: the
built-in federation of ``secure-dfml run`` (``secure_dfml.config.default_config``:
scatter-linear / scatter-cnn / scatter-mlp cycled over peers, 20 rounds, all peers per
round in 2 groups, batch 256, lr 0.1, 4 mutual-learning epochs, DP class prior,
per-model clipping, noise planned on the public schedule).  Each budget is one
point of :func:`secure_dfml.orchestration.tune.tune_budgets` -- the same federation, seed
and data split at every point -- so the table is exactly what
``secure-dfml tune --epsilons 1,2,4,8,inf`` reports; the non-private point is
the same configuration with ``privacy.enabled = false``.

Each sweep is repeated for every federation seed (``--seeds``, default 0, 1 and 2:
the seed fixes the data split, the models' initialisation and the noise), two
sweeps at a time in worker processes (``--jobs``).

Target: at epsilon 8, within 5 points of non-private (same settings), judged on
the mean gap over the seeds; each seed's gap is reported beside it.

    python benchmarks/bench_dp_utility.py --quick        # fashion-mnist-mini (bundled, 60k 14x14 images; 37 min with --jobs 3 on 2 cores)
    python benchmarks/bench_dp_utility.py                # + the real Fashion-MNIST (../shared/data, 60k 28x28; not run for this release)
    python benchmarks/bench_dp_utility.py --ablate       # epsilon 8: what each DP design choice is worth

Writes benchmarks/results/dp_utility.{json,md,png} (``--ablate``:
dp_utility_ablation.{json,md}).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from secure_dfml._jsonutil import pct

RESULTS = Path(__file__).resolve().parent / "results"
EPSILONS: list[float] = [1.0, 2.0, 4.0, 8.0, math.inf]

#: one settings column: the built-in configuration as shipped
SETTINGS: dict[str, dict[str, dict[str, Any]]] = {"built-in": {}}

MODES: dict[str, dict[str, Any]] = {
    "quick": {"datasets": {"fashion-mnist-mini": {}}, "settings": ["built-in"]},
    "full": {
        "datasets": {
            "fashion-mnist-mini": {},
            "fashion-mnist": {"max_test_samples": 2_000},
        },
        "settings": ["built-in"],
    },
}


def make_config(dataset: str, data_overrides: dict[str, Any], settings: str, *, rounds: int | None = None,
                seed: int = 0):
    from secure_dfml.config import default_config

    cfg = default_config()
    cfg = cfg.replace(data={"name": dataset, "partition": "dirichlet", "dirichlet_alpha": 0.5, **data_overrides},
                      privacy={"enabled": True})
    cfg = cfg.replace(federation={"seed": seed} if rounds is None else {"seed": seed, "rounds": rounds})
    for section, values in SETTINGS[settings].items():
        cfg = cfg.replace(**{section: values})
    assert cfg.federation.peers == 10 and len(set(cfg.models.mix)) >= 3  # 10 peers, heterogeneous models
    return cfg


def _env() -> dict[str, Any]:
    import opacus

    return {
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "opacus": opacus.__version__,
        "threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()),
    }


def _points(cost: float | None) -> float | None:
    """An accuracy cost (a fraction) in percentage points."""
    return None if cost is None else 100 * cost


def _per_arch(point: dict[str, Any]) -> dict[str, float]:
    by: dict[str, list[float]] = {}
    for p in point.get("peers", {}).values():
        if p.get("global_acc") is not None:
            by.setdefault(p["arch"], []).append(p["global_acc"])
    return {a: float(np.mean(v)) for a, v in sorted(by.items())}


def _sweep(dataset: str, data_over: dict[str, Any], s: str, seed: int, rounds: int | None,
           runs_root: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One ``tune_budgets`` sweep (every epsilon, one federation seed): its table rows and config."""
    from secure_dfml.orchestration.tune import tune_budgets

    torch.set_num_threads(1)
    cfg = make_config(dataset, data_over, s, rounds=rounds, seed=seed)
    out = runs_root / f"{dataset}-{s}-seed{seed}"
    t0 = time.perf_counter()

    def progress(ev: Any) -> None:
        if ev.kind == "point_end":
            p = ev.detail
            print(f"[{dataset} / {s} / seed {seed}] eps {p['label']}: {p.get('status')} global "
                  f"{p.get('mean_global_acc')}", file=sys.stderr, flush=True)

    res = tune_budgets(cfg, epsilons=EPSILONS, out_dir=out, progress=progress, overwrite=True)
    rows: list[dict[str, Any]] = []
    for p in res["points"]:
        rows.append({
            "dataset": dataset,
            "settings": s,
            "seed": seed,
            "settings_overrides": SETTINGS[s],
            "epsilon": p["label"],
            "status": p["status"],
            "mean_global_acc": p.get("mean_global_acc"),
            "best_mean_global_acc": p.get("best_mean_global_acc"),
            "last5_mean_global_acc": p.get("mean_global_acc_last5"),
            "mean_local_acc": p.get("mean_local_acc"),
            "gap_to_non_private_points": _points(p.get("accuracy_cost")),
            "gap_last5_points": _points(p.get("accuracy_cost_last5")),
            "epsilon_spent_max": p.get("epsilon_spent_max"),
            "within_budget": p.get("within_budget"),
            "phases_refused": (p.get("phases") or {}).get("refused"),
            "phases_run": (p.get("phases") or {}).get("run"),
            "noise_multiplier": {k: v.get("noise_multiplier") for k, v in p.get("peers", {}).items()}
            if p["private"] else None,
            "per_arch_global_acc": _per_arch(p),
            "seconds_per_round": p.get("seconds_per_round"),
            "overhead": (p.get("overhead") or {}).get("seconds_per_round"),
        })
    rows[-1]["sweep_seconds"] = time.perf_counter() - t0
    done = next((q for q in res["points"] if q["status"] == "done"), None)  # same split at every point
    summary = json.loads((out / done["run_dir"] / "summary.json").read_text()) if done else {}
    for r in rows:
        r["train_samples_per_peer"] = summary.get("train_samples_per_peer")
        r["rounds"] = res["rounds"]
        r["tune_dir"] = str(out)
    return rows, res["config"]


def run_sweeps(mode: dict[str, Any], settings: list[str], seeds: list[int], runs_root: Path, rounds: int | None,
               configs: dict[str, Any], jobs: int) -> list[dict[str, Any]]:
    """Every (data set, settings, seed) sweep, ``jobs`` at a time in worker processes."""
    tasks = [(d, over, s, seed, rounds, runs_root) for d, over in mode["datasets"].items() for s in settings
             for seed in seeds]
    if jobs > 1:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_sweep, *zip(*tasks)))
    else:
        results = [_sweep(*t) for t in tasks]
    rows: list[dict[str, Any]] = []
    for (d, _, s, _, _, _), (task_rows, config) in zip(tasks, results, strict=True):
        configs[f"{d}/{s}"] = config
        rows += task_rows
    return rows


def _describe_federation(data: dict[str, Any]) -> str:
    cfg = next(iter(data.get("configs", {}).values()), None)
    if not cfg:
        return "see dp_utility.json"
    f, d, m = cfg["federation"], cfg["dfml"], cfg["models"]
    return (f"{f['peers']} peers, {f['participants']} participants per round in {f['groups']} group(s), "
            f"{f['rounds']} rounds, {cfg['data']['partition']}({cfg['data']['dirichlet_alpha']}) split, "
            f"models {'/'.join(m['mix'])}, "
            f"ml_epochs {d['ml_epochs']}, local_epochs {d['local_epochs']}, batch {d['batch_size']}, lr {d['lr']}, "
            f"C = {cfg['privacy']['max_grad_norm']} ({cfg['privacy']['clipping']} clipping), class prior "
            f"{cfg['privacy']['class_prior']}, {cfg['privacy']['accountant'].upper()}, noise planned on the "
            f"{cfg['privacy']['plan_on']}")


def render_md(data: dict[str, Any]) -> str:
    rows = data["rows"]
    lines = [
        "# DP utility: DFML global accuracy vs epsilon",
        "",
        f"Command: `{data['command']}`  ",
        f"Machine: {data['env']['machine']}, torch {data['env']['torch']} ({data['env']['threads']} thread), "
        f"Opacus {data['env']['opacus']}; load average {data['env']['load_average']} at start (shared CPU).  ",
        f"Federation: the built-in default ({_describe_federation(data)}), "
        "one `secure-dfml tune` sweep per data set and settings; accuracy = mean global accuracy over peers "
        "(final round, and the mean of the last 5 rounds: DP runs swing from round to round).",
        "",
        "| data set | settings | seed | epsilon | mean global % (final) | last-5-round mean % | best round % | "
        "gap to non-private (pts, final / last-5) | eps spent max | phases refused | per-arch global % | s/round |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        arch = ", ".join(f"{a} {pct(v)}" for a, v in r["per_arch_global_acc"].items())
        gap = "-" if r["epsilon"] == "inf" or r["gap_to_non_private_points"] is None else \
            f"{r['gap_to_non_private_points']:.1f} / " + (
                "-" if r.get("gap_last5_points") is None else f"{r['gap_last5_points']:.1f}")
        eps = "non-private" if r["epsilon"] == "inf" else r["epsilon"]
        spent = "-" if r["epsilon_spent_max"] is None else f"{r['epsilon_spent_max']:.2f}"
        refused = "-" if r["phases_refused"] is None or r["epsilon"] == "inf" else \
            f"{r['phases_refused']}/{r['phases_refused'] + r['phases_run']}"
        lines.append(
            f"| {r['dataset']} | {r['settings']} | {r['seed']} | {eps} | {pct(r['mean_global_acc'])} | "
            f"{pct(r.get('last5_mean_global_acc'))} | {pct(r['best_mean_global_acc'])} | {gap} | {spent} | {refused} | {arch} | "
            f"{r['seconds_per_round'] or 0:.2f} |"
        )
    lines += ["", "Target: at epsilon 8, within 5 points of non-private (same settings; mean over the seeds)."]
    for t in data["target_rows"]:
        per_seed = ", ".join(f"seed {k}: {v:.1f}" for k, v in t["gap_per_seed"].items())
        lines.append(f"- {t['dataset']} / {t['settings']}: mean gap at epsilon 8 = {t['gap']:.1f} points "
                     f"({per_seed}) -> {'MET' if t['met'] else 'MISSED'}")
    lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    finite = sorted({float(r["epsilon"]) for r in rows if r["epsilon"] != "inf"})
    inf_x = finite[-1] * 2.5 if finite else 1.0
    for key in sorted({(r["dataset"], r["settings"], r["seed"]) for r in rows}):
        pts = [r for r in rows if (r["dataset"], r["settings"], r["seed"]) == key
               and r["mean_global_acc"] is not None]
        xs = [inf_x if r["epsilon"] == "inf" else float(r["epsilon"]) for r in pts]
        order = np.argsort(xs)
        ax.plot(np.asarray(xs)[order], np.asarray([r["mean_global_acc"] for r in pts])[order], "-o",
                label=f"{key[0]}, {key[1]} settings, seed {key[2]}")
    ax.set_xscale("log")
    ax.set_xticks(finite + [inf_x])
    ax.set_xticklabels([f"{v:g}" for v in finite] + ["non-private"])
    ax.minorticks_off()
    if finite:
        ax.axvline(math.sqrt(finite[-1] * inf_x), color="grey", lw=0.8, ls=":")
    ax.set_xlabel("epsilon per peer (log scale)")
    ax.set_ylabel("mean global accuracy (final round)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title("DFML on Fashion-MNIST, 10 peers, Dirichlet(0.5), heterogeneous models")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------- ablation
#: the zoo's large models (the built-in mix of the previous release)
LARGE_MODELS = ("cnn-small", "mlp", "resnet-gn", "cnn-wide")

#: at epsilon 8, each DP design choice of the built-in configuration undone on its own
ABLATIONS: dict[str, dict[str, dict[str, Any]]] = {
    "built-in": {},
    "uniform-prior": {"privacy": {"class_prior": "uniform"}},  # WSM -> plain cross-entropy
    "joint-clipping": {"privacy": {"clipping": "joint"}},
    "expected-plan": {"privacy": {"plan_on": "expected"}},  # noise for the expected, not the public, schedule
    "ml2": {"dfml": {"ml_epochs": 2}},
    # fewer records per peer: the built-in run of stop 8 (20,000 of the 60,000 images, 8 ML epochs)
    "20k-images": {"data": {"max_train_samples": 20_000}, "dfml": {"ml_epochs": 8}},
    "constant-lr": {"dfml": {"lr_schedule": "constant"}},
    # clipping with (almost) no noise and no budget: how much of the cost is clipping, not noise
    "clip-only": {"privacy": {"epsilon": None, "noise_multiplier": 0.001}},
    "large-models": {"models": {"mix": LARGE_MODELS}},
    # the previous built-in mix: small models that learn their features end to end, no fixed scattering
    "learned-features": {"models": {"mix": ("cnn-small", "mlp-small", "cnn-tiny")}},
    # the built-in run of the previous release: large models, batch 32, constant lr 0.02, 2 ML epochs,
    # 10k images, uniform prior, joint clipping, expected-participation plan
    "previous": {
        "models": {"mix": LARGE_MODELS},
        "dfml": {"batch_size": 32, "lr": 0.02, "lr_schedule": "constant", "ml_epochs": 2},
        "data": {"max_train_samples": 10_000},
        "privacy": {"class_prior": "uniform", "clipping": "joint", "plan_on": "expected"},
    },
}


def _run_one(cfg: Any, runs_root: Path, name: str) -> dict[str, Any]:
    from secure_dfml._run import run_federation
    from secure_dfml.orchestration.tune import _phase_counts, _tail_accuracy

    records: list[dict[str, Any]] = []
    slug = "".join(c if c.isalnum() else "-" for c in name)[:60]
    t0 = time.perf_counter()
    summary = run_federation(cfg, runs_root / slug, overwrite=True, plot=False, on_round=records.append)
    eps = [p.get("epsilon_spent") for p in summary["peers"].values() if p.get("epsilon_spent") is not None]
    return {
        "final_global_acc": summary["mean_global_acc"],
        "last5_global_acc": _tail_accuracy(records),
        "best_global_acc": summary["best_mean_global_acc"],
        "phases_refused": _phase_counts(records)["refused"],
        "epsilon_spent_min_max": [min(eps), max(eps)] if eps else None,
        "seconds": time.perf_counter() - t0,
    }


def run_ablation(args: argparse.Namespace) -> None:
    runs_root = args.runs or Path(tempfile.mkdtemp(prefix="secure-dfml-dp-ablation-"))
    json_path = args.out / "dp_utility_ablation.json"
    # rows of earlier invocations are kept (re-running some --variants updates just those)
    earlier = json.loads(json_path.read_text()) if json_path.exists() else {}
    before = earlier.get("commands", [earlier["command"]] if "command" in earlier else [])
    out: dict[str, Any] = {"commands": [*before, "python " + " ".join(sys.argv)],
                           "env": _env(), "epsilon": 8.0, "variants": earlier.get("variants", {})}
    names = args.variants.split(",") if args.variants else list(ABLATIONS)
    unknown = [n for n in names if n not in ABLATIONS]
    if unknown:
        raise SystemExit(f"unknown --variants {unknown}; choose from {', '.join(ABLATIONS)}")
    for name in names:
        for private in (True, False) if name == "built-in" or args.with_non_private else (True,):
            cfg = make_config("fashion-mnist-mini", {}, "built-in", rounds=args.rounds)
            cfg = cfg.replace(privacy={"epsilon": 8.0})
            for section, values in ABLATIONS[name].items():
                cfg = cfg.replace(**{section: values})
            if not private:
                cfg = cfg.replace(privacy={"enabled": False})
            entry = {"overrides": ABLATIONS[name], "private": private, **_run_one(cfg, runs_root, f"{name}-{private}")}
            print(f"{name} private={private}: final {entry['final_global_acc']:.3f}", file=sys.stderr, flush=True)
            run = "non-private" if not private else "epsilon 8" if cfg.privacy.epsilon else "no budget, sigma 0.001"
            out["variants"][f"{name} | {run}"] = entry
            args.out.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(out, indent=2))  # after every run: an interruption loses one run
    md = render_ablation_md(out)
    (args.out / "dp_utility_ablation.md").write_text(md)
    print(md)


def render_ablation_md(out: dict[str, Any]) -> str:
    lines = [
        "# DP utility ablation at epsilon 8 (fashion-mnist-mini, built-in federation)",
        "",
        "Commands: " + "; ".join(f"`{c}`" for c in out["commands"]) + f" (load average {out['env']['load_average']} "
        "at the start of the last).  ",
        "Each row undoes one choice of the built-in configuration (same seed, split and budget).",
        "",
        "| variant | run | final global % | last-5 mean % | best % | phases refused | eps spent (min-max) | seconds |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, e in out["variants"].items():
        name, run = key.split(" | ")
        mm = e["epsilon_spent_min_max"]
        lines.append(
            f"| {name} | {run} | {pct(e['final_global_acc'])} | {pct(e['last5_global_acc'])} | "
            f"{pct(e['best_global_acc'])} | {e['phases_refused'] if e['private'] else '-'} | "
            f"{'-' if not mm else f'{mm[0]:.2f}-{mm[1]:.2f}'} | {e['seconds']:.0f} |"
        )
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fashion-mnist-mini only (37 minutes with --jobs 3 on 2 cores)")
    ap.add_argument("--rounds", type=int, default=None, help="override federation.rounds (default: 20)")
    ap.add_argument("--seeds", default="0,1,2", help="federation seeds (data split, models, noise); the target is "
                    "judged on the mean gap over them (default: 0,1,2)")
    ap.add_argument("--jobs", type=int, default=2, help="sweeps run in parallel, one per process (default: 2)")
    ap.add_argument("--ablate", action="store_true", help="epsilon-8 ablation of the DP design choices instead")
    ap.add_argument("--variants", default=None, help=f"--ablate variants (comma-separated): {', '.join(ABLATIONS)}")
    ap.add_argument("--with-non-private", action="store_true", help="--ablate: also run each variant without DP")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--runs", type=Path, default=None, help="where the sweeps' run directories go (default: a temp dir)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.ablate:
        run_ablation(args)
        return
    mode_name = "quick" if args.quick else "full"
    mode = MODES[mode_name]
    settings = mode["settings"]
    runs_root = args.runs or Path(tempfile.mkdtemp(prefix="secure-dfml-dp-utility-"))
    env = _env()
    t0 = time.perf_counter()
    configs: dict[str, Any] = {}
    seeds = [int(v) for v in args.seeds.split(",")]
    rows = run_sweeps(mode, settings, seeds, runs_root, args.rounds, configs, args.jobs)
    target_rows = []
    for key in sorted({(r["dataset"], r["settings"]) for r in rows}):
        gaps = {r["seed"]: r["gap_to_non_private_points"] for r in rows
                if (r["dataset"], r["settings"]) == key and r["epsilon"] == "8"
                and r["gap_to_non_private_points"] is not None}
        if gaps:
            mean_gap = float(np.mean(list(gaps.values())))
            target_rows.append({"dataset": key[0], "settings": key[1], "gap": mean_gap, "gap_per_seed": gaps,
                                "met": mean_gap <= 5.0})
    data = {
        "benchmark": "dp_utility",
        "mode": mode_name,
        "command": "python benchmarks/bench_dp_utility.py " + " ".join(sys.argv[1:]),
        "env": env,
        "settings": {s: SETTINGS[s] for s in settings},
        "seeds": seeds,
        "configs": configs,
        "epsilons": ["inf" if math.isinf(e) else e for e in EPSILONS],
        "rows": rows,
        "target": {"epsilon": 8, "max_gap_points": 5.0},
        "target_rows": target_rows,
        "seconds": time.perf_counter() - t0,
        "runs_root": str(runs_root),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dp_utility.json").write_text(json.dumps(data, indent=2))
    (args.out / "dp_utility.md").write_text(render_md(data))
    plot(rows, args.out / "dp_utility.png")
    print(render_md(data))


if __name__ == "__main__":
    main()
