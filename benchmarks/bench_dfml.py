"""DFML vs baselines on Fashion-MNIST and CIFAR-10 (issue 2 benchmark).

Runs DFML and every applicable baseline with equal rounds on the same engine,
data and split: ~20 peers, IID and Dirichlet(0.1), homogeneous and heterogeneous
models.  Writes benchmarks/results/dfml[_quick].json and .md: global and local
accuracy (current and peak), seconds per round, pure compute seconds per round
(the forward/backward/step time measured inside the same run), their ratio
(engine overhead), and bytes per round.

    python benchmarks/bench_dfml.py --quick     # about 20 minutes on 2 cores
    python benchmarks/bench_dfml.py --full --seeds 1,2 --jobs 2
                                                # full sweep, mean and spread over the seeds, curves per setting

Each setting also gets a plot of mean global accuracy over the rounds per algorithm
(``dfml_<mode>_<data>_<partition>_<models>.png``).
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from secure_dfml import config_from_dict, run_federation

RESULTS = Path(__file__).resolve().parent / "results"
HETERO = {"fashion-mnist": ["cnn-small", "mlp", "resnet-gn", "cnn-wide"], "cifar10": ["cnn-small", "mlp", "resnet-gn", "cnn-wide"]}
HOMO = {"fashion-mnist": ["cnn-small"], "cifar10": ["cnn-small"]}
ALGOS_HETERO = ["dfml", "def-kt", "local"]
ALGOS_HOMO = ["dfml", "gossip-avg", "def-kt", "local", "fedavg-central"]

MODES: dict[str, dict[str, Any]] = {
    "quick": {
        "datasets": ["fashion-mnist", "cifar10"],
        "partitions": [("dirichlet", 0.1), ("iid", None)],
        "peers": 20, "participants": 20, "groups": 4, "rounds": 15, "eval_every": 5,
        "max_train": {"fashion-mnist": 8000, "cifar10": 6000}, "max_test": 500,
        "ml_epochs": 2, "hetero_mix": {"fashion-mnist": ["cnn-small", "mlp", "cnn-wide"], "cifar10": ["cnn-small", "mlp", "resnet-gn"]},
    },
    "full": {
        "datasets": ["fashion-mnist", "cifar10"],
        "partitions": [("dirichlet", 0.1), ("iid", None)],
        "peers": 20, "participants": 20, "groups": 4, "rounds": 40, "eval_every": 5,
        "max_train": {"fashion-mnist": 30000, "cifar10": 30000}, "max_test": 2000,
        "ml_epochs": 2, "hetero_mix": HETERO,
    },
}


def config(mode: dict[str, Any], dataset: str, partition: tuple[str, float | None], mix: list[str], algorithm: str,
           *, seed: int = 1):
    data: dict[str, Any] = {
        "name": dataset, "partition": partition[0], "auditor_pool": 500,
        "max_train_samples": mode["max_train"][dataset], "max_test_samples": mode["max_test"],
    }
    if partition[1] is not None:
        data["dirichlet_alpha"] = partition[1]
    return config_from_dict({
        "federation": {"id": "bench", "peers": mode["peers"], "participants": mode["participants"],
                        "groups": mode["groups"], "rounds": mode["rounds"], "algorithm": algorithm, "seed": seed,
                        "eval_every": mode["eval_every"]},
        "data": data,
        "models": {"mix": mix},
        "dfml": {"ml_epochs": mode["ml_epochs"], "period": max(2, mode["rounds"] // 3)},
        "crypto": {"channel": "nacl"},
    })


def _label(dataset: str, partition: tuple[str, float | None], models: str, algorithm: str) -> str:
    return f"{dataset}/{partition[0]}{'' if partition[1] is None else partition[1]}/{models}/{algorithm}"


def one_run(job: dict[str, Any]) -> dict[str, Any]:
    """One federation (a worker process's job): its summary row and its accuracy-over-rounds curve."""
    torch.set_num_threads(1)
    mode, dataset, partition = job["mode"], job["dataset"], tuple(job["partition"])
    cfg = config(mode, dataset, partition, job["mix"], job["algorithm"], seed=job["seed"])  # type: ignore[arg-type]
    run_dir = Path(job["runs_root"]) / (_label(dataset, partition, job["models"], job["algorithm"]).replace("/", "_")
                                        + f"_seed{job['seed']}")
    t0 = time.perf_counter()
    s = run_federation(cfg, run_dir, plot=False, overwrite=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    key = "server_global_acc" if job["algorithm"] == "fedavg-central" else "mean_global_acc"
    curve = [(r["round"] + 1, r[key]) for r in records if r.get(key) is not None]
    return {
        "dataset": dataset, "partition": f"{partition[0]}{'' if partition[1] is None else '(' + str(partition[1]) + ')'}",
        "models": job["models"], "algorithm": job["algorithm"], "seed": job["seed"],
        "global_acc": s["mean_global_acc"], "local_acc": s["mean_local_acc"],
        "peak_global_acc": s["mean_peak_global_acc"], "peak_local_acc": s["mean_peak_local_acc"],
        "server_acc": s["server_global_acc"],
        "seconds_per_round": s["seconds_per_round"],
        "compute_seconds_per_round": s["compute_seconds_per_round"],
        "overhead": s["seconds_per_round"] / max(s["compute_seconds_per_round"], 1e-9),
        "bytes_per_round": s["bytes_per_round"], "wall_seconds": time.perf_counter() - t0,
        "curve": curve,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sweep (~20 min on 2 cores)")
    ap.add_argument("--full", action="store_true", help="the full sweep (the default mode; the flag says so explicitly)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--datasets", help="comma-separated subset of the mode's data sets")
    ap.add_argument("--algorithms", help="comma-separated subset of algorithms")
    ap.add_argument("--seeds", default="1", help="comma-separated federation seeds; mean and spread over them")
    ap.add_argument("--rounds", type=int, help="override the mode's rounds (smoke tests)")
    ap.add_argument("--jobs", type=int, default=1, help="federations trained at once in worker processes")
    args = ap.parse_args()
    if args.quick and args.full:
        ap.error("--quick and --full exclude each other")
    torch.set_num_threads(1)
    name = "quick" if args.quick else "full"
    mode = dict(MODES[name])
    if args.datasets:
        mode["datasets"] = args.datasets.split(",")
    if args.rounds:
        mode["rounds"] = args.rounds
    seeds = [int(x) for x in args.seeds.split(",")]
    wanted = set(args.algorithms.split(",")) if args.algorithms else None
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = name + ("_" + args.datasets.replace(",", "_") if args.datasets else "")
    runs_root = Path("/tmp") / f"secure-dfml-bench-{int(time.time())}"
    jobs: list[dict[str, Any]] = []
    for dataset in mode["datasets"]:
        for partition in mode["partitions"]:
            settings = [("heterogeneous", mode["hetero_mix"][dataset], ALGOS_HETERO),
                        ("homogeneous", HOMO[dataset], ALGOS_HOMO)]
            for models_label, mix, algos in settings:
                for algorithm in algos:
                    if wanted is not None and algorithm not in wanted:
                        continue
                    for seed in seeds:
                        jobs.append({"mode": mode, "dataset": dataset, "partition": list(partition), "mix": mix,
                                     "models": models_label, "algorithm": algorithm, "seed": seed,
                                     "runs_root": str(runs_root)})
    rows: list[dict[str, Any]] = []
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for row in pool.map(one_run, jobs):
            rows.append(row)
            write(args.out, suffix, name, mode, rows, seeds)
            print(f"{row['dataset']}/{row['partition']}/{row['models']}/{row['algorithm']} seed {row['seed']}: "
                  f"global {row['global_acc']:.3f} local {row['local_acc']:.3f} {row['seconds_per_round']:.2f}s/round",
                  flush=True)
    plots = plot_curves(args.out, suffix, rows)
    write(args.out, suffix, name, mode, rows, seeds, plots)
    print(markdown(rows, name, mode, seeds, plots))


def _groups(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str, str], list[dict[str, Any]]]:
    out: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault((r["dataset"], r["partition"], r["models"], r["algorithm"]), []).append(r)
    return out


def _acc(r: dict[str, Any]) -> float:
    return r["server_acc"] if r["algorithm"] == "fedavg-central" else r["global_acc"]


def plot_curves(out: Path, suffix: str, rows: list[dict[str, Any]]) -> list[str]:
    """One PNG per (data set, partition, models): mean global accuracy over the rounds per algorithm (over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings: dict[tuple[str, str, str], dict[str, list[list[tuple[int, float]]]]] = {}
    for (d, p, m, a), rs in _groups(rows).items():
        settings.setdefault((d, p, m), {})[a] = [r["curve"] for r in rs]
    files = []
    for (d, p, m), algos in sorted(settings.items()):
        fig, ax = plt.subplots(figsize=(6, 4))
        for a, curves in sorted(algos.items()):
            rounds = [x for x, _ in curves[0]]
            mean = [sum(c[i][1] for c in curves) / len(curves) for i in range(len(rounds))]
            ax.plot(rounds, [100 * v for v in mean], marker="o", label=a)
        ax.set(xlabel="round", ylabel="global accuracy %", title=f"{d}, {p}, {m} models")
        ax.grid(alpha=0.3)
        ax.legend()
        name = f"dfml_{suffix}_{d}_{p}_{m}.png".replace("(", "").replace(")", "")
        fig.tight_layout()
        fig.savefig(out / name, dpi=110, metadata={"Software": None})
        plt.close(fig)
        files.append(name)
    return files


def write(out: Path, suffix: str, name: str, mode: dict[str, Any], rows: list[dict[str, Any]], seeds: list[int],
          plots: list[str] | None = None) -> None:
    """Rewrite the JSON and markdown after every run, so an interrupted sweep keeps its results."""
    meta = {"mode": name, "settings": mode, "seeds": seeds, "torch_threads": 1, "plots": plots or []}
    (out / f"dfml_{suffix}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (out / f"dfml_{suffix}.md").write_text(markdown(rows, name, mode, seeds, plots))


def markdown(rows: list[dict[str, Any]], name: str, mode: dict[str, Any], seeds: list[int],
             plots: list[str] | None = None) -> str:
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = [
        f"# DFML benchmark ({name}): {mode['peers']} peers, {mode['participants']} participants/round in "
        f"{mode['groups']} groups, {mode['rounds']} rounds, seeds {', '.join(map(str, seeds))}",
        "",
        "Global accuracy: the mean over the seeds, +- half the range between them (fedavg-central: its server's "
        "model); each seed's value in the seeds column.",
        "",
        "| data | partition | models | algorithm | global % | seeds | local % | peak global % | s/round | MB/round |",
        "|---|---|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for (d, p, m, a), rs in _groups(rows).items():
        accs = [_acc(r) for r in rs]
        mean = sum(accs) / len(accs)
        spread = (max(accs) - min(accs)) / 2
        avg = lambda k: sum(r[k] for r in rs if r[k] is not None) / max(1, sum(r[k] is not None for r in rs))  # noqa: E731
        lines.append(
            f"| {d} | {p} | {m} | {a} | {pct(mean)} +- {100 * spread:.1f} | {' / '.join(pct(x) for x in accs)} | "
            f"{pct(avg('local_acc'))} | {pct(avg('peak_global_acc'))} | {avg('seconds_per_round'):.2f} | "
            f"{avg('bytes_per_round') / 1e6:.2f} |"
        )
    if plots:
        lines += ["", "Accuracy over the rounds: " + ", ".join(f"[{p}]({p})" for p in plots)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
