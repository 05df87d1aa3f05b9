"""DFML vs baselines on Fashion-MNIST and CIFAR-10 (issue 2 benchmark).

Runs DFML and every applicable baseline with equal rounds on the same engine,
data and split: ~20 peers, IID and Dirichlet(0.1), homogeneous and heterogeneous
models.  Writes benchmarks/results/dfml[_quick].json and .md: global and local
accuracy (current and peak), seconds per round, pure compute seconds per round
(the forward/backward/step time measured inside the same run), their ratio
(engine overhead), and bytes per round.

    python benchmarks/bench_dfml.py --quick     # about 20 minutes on 2 cores
    python benchmarks/bench_dfml.py             # full sweep
"""

from __future__ import annotations

import argparse
import json
import time
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


def config(mode: dict[str, Any], dataset: str, partition: tuple[str, float | None], mix: list[str], algorithm: str):
    data: dict[str, Any] = {
        "name": dataset, "partition": partition[0], "auditor_pool": 500,
        "max_train_samples": mode["max_train"][dataset], "max_test_samples": mode["max_test"],
    }
    if partition[1] is not None:
        data["dirichlet_alpha"] = partition[1]
    return config_from_dict({
        "federation": {"id": "bench", "peers": mode["peers"], "participants": mode["participants"],
                        "groups": mode["groups"], "rounds": mode["rounds"], "algorithm": algorithm, "seed": 1,
                        "eval_every": mode["eval_every"]},
        "data": data,
        "models": {"mix": mix},
        "dfml": {"ml_epochs": mode["ml_epochs"], "period": max(2, mode["rounds"] // 3)},
        "crypto": {"channel": "nacl"},
    })


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sweep (~20 min on 2 cores)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--datasets", help="comma-separated subset of the mode's data sets")
    ap.add_argument("--algorithms", help="comma-separated subset of algorithms")
    args = ap.parse_args()
    torch.set_num_threads(1)
    name = "quick" if args.quick else "full"
    mode = dict(MODES[name])
    if args.datasets:
        mode["datasets"] = args.datasets.split(",")
    wanted = set(args.algorithms.split(",")) if args.algorithms else None
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = name + ("_" + args.datasets.replace(",", "_") if args.datasets else "")
    rows: list[dict[str, Any]] = []
    runs_root = Path("/tmp") / f"secure-dfml-bench-{int(time.time())}"
    for dataset in mode["datasets"]:
        for partition in mode["partitions"]:
            settings = [("heterogeneous", mode["hetero_mix"][dataset], ALGOS_HETERO),
                        ("homogeneous", HOMO[dataset], ALGOS_HOMO)]
            for models_label, mix, algos in settings:
                for algorithm in algos:
                    if wanted is not None and algorithm not in wanted:
                        continue
                    cfg = config(mode, dataset, partition, mix, algorithm)
                    label = f"{dataset}/{partition[0]}{'' if partition[1] is None else partition[1]}/{models_label}/{algorithm}"
                    t0 = time.perf_counter()
                    s = run_federation(cfg, runs_root / label.replace("/", "_"), plot=False)
                    row = {
                        "dataset": dataset, "partition": f"{partition[0]}{'' if partition[1] is None else '(' + str(partition[1]) + ')'}",
                        "models": models_label, "algorithm": algorithm,
                        "global_acc": s["mean_global_acc"], "local_acc": s["mean_local_acc"],
                        "peak_global_acc": s["mean_peak_global_acc"], "peak_local_acc": s["mean_peak_local_acc"],
                        "server_acc": s["server_global_acc"],
                        "seconds_per_round": s["seconds_per_round"],
                        "compute_seconds_per_round": s["compute_seconds_per_round"],
                        "overhead": s["seconds_per_round"] / max(s["compute_seconds_per_round"], 1e-9),
                        "bytes_per_round": s["bytes_per_round"], "wall_seconds": time.perf_counter() - t0,
                    }
                    rows.append(row)
                    write(args.out, suffix, name, mode, rows)
                    print(f"{label}: global {row['global_acc']:.3f} local {row['local_acc']:.3f} "
                          f"{row['seconds_per_round']:.2f}s/round overhead {row['overhead']:.2f}x", flush=True)
    print(markdown(rows, name, mode))


def write(out: Path, suffix: str, name: str, mode: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Rewrite the JSON and markdown after every run, so an interrupted sweep keeps its results."""
    meta = {"mode": name, "settings": mode, "torch_threads": 1}
    (out / f"dfml_{suffix}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (out / f"dfml_{suffix}.md").write_text(markdown(rows, name, mode))


def markdown(rows: list[dict[str, Any]], name: str, mode: dict[str, Any]) -> str:
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = [
        f"# DFML benchmark ({name}): {mode['peers']} peers, {mode['participants']} participants/round in "
        f"{mode['groups']} groups, {mode['rounds']} rounds",
        "",
        "| data | partition | models | algorithm | global % | local % | peak global % | peak local % | s/round | compute s/round | overhead | MB/round |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        g = pct(r["server_acc"]) + " (server)" if r["algorithm"] == "fedavg-central" else pct(r["global_acc"])
        lines.append(
            f"| {r['dataset']} | {r['partition']} | {r['models']} | {r['algorithm']} | {g} | {pct(r['local_acc'])} | "
            f"{pct(r['peak_global_acc'])} | {pct(r['peak_local_acc'])} | {r['seconds_per_round']:.2f} | "
            f"{r['compute_seconds_per_round']:.2f} | {r['overhead']:.2f}x | {r['bytes_per_round'] / 1e6:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
