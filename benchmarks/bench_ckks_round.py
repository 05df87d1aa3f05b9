"""Whole-round cost of CKKS secure averaging vs NaCl-only exchange (issue 3).

Runs the same Fashion-MNIST federation (homogeneous models so that every group
averages, with gossip-avg and with DFML) three ways: plaintext channel, NaCl
envelopes, NaCl envelopes + CKKS secure averaging.  Reports seconds per round,
crypto seconds per round, the crypto share of a round, bytes per round and the
CKKS/NaCl time ratio.  Writes benchmarks/results/ckks_round.{json,md}.

    python benchmarks/bench_ckks_round.py [--rounds 4] [--data fashion-mnist-mini]
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
VARIANTS = {
    "plaintext": {"channel": "none", "allow_insecure": True, "secure_aggregation": "none"},
    "nacl": {"channel": "nacl", "secure_aggregation": "none"},
    "nacl+ckks": {"channel": "nacl", "secure_aggregation": "ckks"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--data", default="fashion-mnist", help="fashion-mnist (../shared/data) or fashion-mnist-mini")
    ap.add_argument("--model", default="cnn-small")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    for algorithm in ("gossip-avg", "dfml"):
        for name, crypto in VARIANTS.items():
            cfg = config_from_dict({
                "federation": {"id": "ckks-bench", "peers": 12, "participants": 6, "rounds": args.rounds,
                               "algorithm": algorithm, "eval_every": args.rounds},
                "data": {"name": args.data, "partition": "iid", "max_train_samples": 12000,
                         "max_test_samples": 1000, "auditor_pool": 200},
                "models": {"mix": [args.model]},
                "dfml": {"ml_epochs": 1, "average_same_arch": True},
                "crypto": crypto,
            })
            t0 = time.perf_counter()
            s = run_federation(cfg, Path("/tmp") / f"ckks-bench-{algorithm}-{name}-{time.time_ns()}", plot=False)
            rows.append({
                "algorithm": algorithm, "variant": name,
                "seconds_per_round": s["seconds_per_round"],
                "compute_seconds_per_round": s["compute_seconds_per_round"],
                "crypto_seconds_per_round": s["crypto_seconds_per_round"],
                "crypto_share": s["crypto_seconds_per_round"] / s["seconds_per_round"],
                "bytes_per_round": s["bytes_per_round"], "global_acc": s["mean_global_acc"],
                "wall_seconds": time.perf_counter() - t0,
            })
            print(rows[-1], flush=True)
    base = {(r["algorithm"]): r["seconds_per_round"] for r in rows if r["variant"] == "nacl"}
    for r in rows:
        r["time_vs_nacl"] = r["seconds_per_round"] / base[r["algorithm"]]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"ckks_round_{args.model}"
    (args.out / f"{stem}.json").write_text(json.dumps({"settings": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=2))
    lines = [
        f"# Whole-round cost of secure averaging ({args.data}, 12 peers, 6 per round, {args.model}, {args.rounds} rounds)",
        "",
        "| algorithm | exchange | s/round | compute s/round | crypto s/round | crypto share | MB/round | time vs NaCl | global % |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['algorithm']} | {r['variant']} | {r['seconds_per_round']:.2f} | {r['compute_seconds_per_round']:.2f} | "
            f"{r['crypto_seconds_per_round']:.3f} | {100 * r['crypto_share']:.1f}% | {r['bytes_per_round'] / 1e6:.2f} | "
            f"{r['time_vs_nacl']:.2f}x | {100 * r['global_acc']:.1f} |"
        )
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
