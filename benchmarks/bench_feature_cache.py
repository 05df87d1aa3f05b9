"""Fixed-feature cache: the built-in federation with and without it, with and without DP.

The built-in federation (``secure_dfml.default_config()``: 10 peers,
scatter-linear / scatter-cnn / scatter-mlp on Fashion-MNIST-mini 14x14, 2 groups
of 5 per round) for ``--rounds`` rounds, four times: ``federation.feature_cache``
true / false x ``privacy.enabled`` true / false.  Each run is its own process
(one torch thread), so its peak RSS is its own.  Reports seconds per round
(training and exchange; evaluation; both), end-to-end wall time (federation
built, every round, run directory written), peak RSS, the final metrics (equal
with and without the cache) and the DP / non-private round-time ratio.

    python benchmarks/bench_feature_cache.py [--rounds 3]

Writes benchmarks/results/feature_cache.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def child(rounds: int, cache: bool, private: bool) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    from secure_dfml import default_config, run_federation

    cfg = default_config().replace(
        federation={"rounds": rounds, "feature_cache": cache}, privacy={"enabled": private}
    )
    records: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        summary = run_federation(cfg, Path(tmp) / "run", plot=False, on_round=records.append)
    wall = time.perf_counter() - t0
    n = len(records)
    train = [float(r["seconds"]) for r in records]
    evals = [float(r["eval_seconds"]) for r in records]
    return {
        "feature_cache": cache,
        "private": private,
        "rounds": n,
        "round_seconds": [a + b for a, b in zip(train, evals)],
        "train_exchange_seconds_per_round": sum(train) / n,
        "eval_seconds_per_round": sum(evals) / n,
        "seconds_per_round": (sum(train) + sum(evals)) / n,
        "compute_seconds_per_round": sum(float(r["compute_seconds"]) for r in records) / n,
        "wall_seconds": wall,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "mean_global_acc": summary["mean_global_acc"],
        "mean_local_acc": summary["mean_local_acc"],
        "final_peers": {pid: {k: e.get(k) for k in ("global_acc", "local_acc", "epsilon_spent")}
                        for pid, e in summary["peers"].items()},
    }


def run_child(rounds: int, cache: bool, private: bool) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", "--rounds", str(rounds), "--cache", str(int(cache)),
           "--private", str(int(private))]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def render(result: dict[str, Any]) -> str:
    runs = result["runs"]
    lines = [
        "# Fixed-feature cache (`federation.feature_cache`)",
        "",
        f"The built-in federation (10 peers, scatter-linear / scatter-cnn / scatter-mlp, Fashion-MNIST-mini 14x14, "
        f"2 groups of 5 per round), {result['rounds']} rounds, one torch thread, each run in its own process "
        f"({result['machine']}). `python benchmarks/bench_feature_cache.py --rounds {result['rounds']}`.",
        "",
        "| DP | cache | s / round | train + exchange | evaluation | compute | wall (end to end) | peak RSS | "
        "final global acc |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(
            f"| {'on' if r['private'] else 'off'} | {'on' if r['feature_cache'] else 'off'} | "
            f"{r['seconds_per_round']:.2f} | {r['train_exchange_seconds_per_round']:.2f} | "
            f"{r['eval_seconds_per_round']:.2f} | {r['compute_seconds_per_round']:.2f} | {r['wall_seconds']:.1f} s | "
            f"{r['peak_rss_mib']:.0f} MiB | {100 * r['mean_global_acc']:.2f}% |"
        )
    s = result["summary"]
    lines += [
        "",
        f"* speed-up from the cache, seconds per round: non-private {s['speedup_nonprivate']:.2f}x, "
        f"DP {s['speedup_private']:.2f}x; end to end: non-private {s['wall_speedup_nonprivate']:.2f}x, "
        f"DP {s['wall_speedup_private']:.2f}x",
        f"* DP round / non-private round: {s['dp_ratio_cache']:.2f}x with the cache, "
        f"{s['dp_ratio_no_cache']:.2f}x without (end to end: {s['dp_wall_ratio_cache']:.2f}x / "
        f"{s['dp_wall_ratio_no_cache']:.2f}x)",
        f"* final metrics equal with and without the cache: non-private {s['equal_nonprivate']}, DP {s['equal_private']} "
        "(seeded research mode; the features are computed with the model's own float32 operations)",
        "",
        "Seconds per round = training and exchange plus evaluation of every peer (global and local test sets) as "
        "the run's metrics record them; wall = building the federation, all rounds, checkpoints and the run "
        "directory. The privacy accounting is the same with and without the cache (the front end has no "
        "parameters: same per-sample clipped gradients, same mechanisms; tests/test_feature_cache.py).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cache", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--private", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.rounds, bool(args.cache), bool(args.private))))
        return
    runs = []
    for private in (False, True):
        for cache in (True, False):
            r = run_child(args.rounds, cache, private)
            print(f"DP {private!s:5} cache {cache!s:5}: {r['seconds_per_round']:.2f} s/round, "
                  f"wall {r['wall_seconds']:.1f} s, peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
            runs.append(r)
    by = {(r["private"], r["feature_cache"]): r for r in runs}

    def ratio(a: tuple[bool, bool], b: tuple[bool, bool], key: str = "seconds_per_round") -> float:
        return by[a][key] / by[b][key]

    def same(private: bool) -> bool:
        a, b = by[(private, True)], by[(private, False)]
        return a["final_peers"] == b["final_peers"] and a["mean_global_acc"] == b["mean_global_acc"]

    summary = {
        "speedup_nonprivate": ratio((False, False), (False, True)),
        "speedup_private": ratio((True, False), (True, True)),
        "wall_speedup_nonprivate": ratio((False, False), (False, True), "wall_seconds"),
        "wall_speedup_private": ratio((True, False), (True, True), "wall_seconds"),
        "dp_ratio_cache": ratio((True, True), (False, True)),
        "dp_ratio_no_cache": ratio((True, False), (False, False)),
        "dp_wall_ratio_cache": ratio((True, True), (False, True), "wall_seconds"),
        "dp_wall_ratio_no_cache": ratio((True, False), (False, False), "wall_seconds"),
        "equal_nonprivate": same(False),
        "equal_private": same(True),
    }
    result = {
        "rounds": args.rounds,
        "machine": f"{platform.machine()}, {platform.python_implementation()} {platform.python_version()}",
        "runs": runs,
        "summary": summary,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "feature_cache.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (RESULTS / "feature_cache.md").write_text(render(result), encoding="utf-8")
    print(render(result))


if __name__ == "__main__":
    main()
