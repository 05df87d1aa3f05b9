"""Real peers as processes on loopback (ZeroMQ, NaCl envelopes) vs the in-process simulation.

Three measurements, each written to benchmarks/results/peers_<mode>.{json,md}:

* ``throughput``: the built-in federation (10 peers, DP, 2 groups of 5 per
  round) for ``--rounds`` rounds, simulated in one process and launched as 10
  peer processes.  Rounds per minute in the steady state (first to last round
  report) and end to end (start-up included).  Target: processes >= 0.8x.
* ``faults``: the same federation as 10 processes; ``--kills`` peers are
  killed (SIGKILL) at random rounds and restarted by the launcher.  Reports
  what was lost: rounds completed, every ledger re-verified and never
  decreasing while the run went on, where each restarted peer resumed.
* ``ckks``: a CKKS-protected round vs a NaCl-only round with real messages
  among 7 peer processes (1 group of 6: one aggregator, 5 contributors of one
  architecture, an idle key holder), for ``mlp`` and ``cnn-small`` on
  Fashion-MNIST 28x28 (../shared/data).  Target: CKKS at most 1.5x.

    python benchmarks/bench_peers.py --mode throughput [--rounds 6]
    python benchmarks/bench_peers.py --mode faults [--rounds 8 --kills 2]
    python benchmarks/bench_peers.py --mode ckks [--rounds 4]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from secure_dfml import config_from_dict, default_config, run_federation
from secure_dfml.config import RunConfig
from secure_dfml.orchestration.launch import Launcher, launch_federation
from secure_dfml.privacy import PrivacyLedger

RESULTS = Path(__file__).resolve().parent / "results"


def _timed(run: Any) -> tuple[dict[str, Any], list[float], float]:
    stamps: list[float] = []
    t0 = time.perf_counter()
    summary = run(lambda record: stamps.append(time.perf_counter()))
    return summary, stamps, time.perf_counter() - t0


def _rates(stamps: list[float], wall: float, rounds: int) -> dict[str, float]:
    steady = (len(stamps) - 1) / (stamps[-1] - stamps[0]) * 60 if len(stamps) > 1 else float("nan")
    per_round = [b - a for a, b in zip(stamps, stamps[1:])]
    return {
        "rounds_per_minute_steady": steady,
        "rounds_per_minute_end_to_end": rounds / wall * 60,
        "median_round_seconds": statistics.median(per_round) if per_round else float("nan"),
        "wall_seconds": wall,
    }


def _builtin(rounds: int, **dfml: float) -> RunConfig:
    cfg = default_config()
    return cfg.replace(federation={"rounds": rounds}, dfml=dfml) if dfml else cfg.replace(federation={"rounds": rounds})


def throughput(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    cfg = _builtin(args.rounds)
    rows = []
    sim, stamps, wall = _timed(lambda cb: run_federation(cfg, tmp / "sim", plot=False, on_round=cb))
    rows.append({"mode": "in-process simulation", **_rates(stamps, wall, args.rounds), "global_acc": sim["mean_global_acc"]})
    net, stamps, wall = _timed(
        lambda cb: launch_federation(cfg, tmp / "net", state_root=tmp / "state", plot=False, on_round=cb)
    )
    rows.append({"mode": "10 peer processes (ZeroMQ)", **_rates(stamps, wall, args.rounds), "global_acc": net["mean_global_acc"]})
    same = (tmp / "sim" / "metrics.jsonl").is_file() and _strip(tmp / "sim") == _strip(tmp / "net")
    ratio = rows[1]["rounds_per_minute_steady"] / rows[0]["rounds_per_minute_steady"]
    return {"rows": rows, "processes_vs_in_process": ratio, "target": 0.8, "met": ratio >= 0.8, "metrics_identical": same}


def _strip(run_dir: Path) -> list[Any]:
    def strip(r: Any) -> Any:
        if isinstance(r, dict):
            return {k: strip(v) for k, v in r.items() if "seconds" not in k}
        if isinstance(r, list):
            return [strip(v) for v in r]
        return r

    return [strip(json.loads(line)) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def faults(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    cfg = _builtin(args.rounds, sender_timeout=20.0, return_timeout=90.0)
    rng = random.Random(args.seed)
    victims = {pid: rng.randrange(1, args.rounds - 1) for pid in rng.sample(range(cfg.federation.peers), args.kills)}
    killed: dict[int, int] = {}
    series: dict[int, list[float]] = {}

    def drill(launcher: Launcher) -> None:
        for pid, rnd in victims.items():
            # at or past the start of that round (a poll can miss a short round), still running
            alive = pid in launcher.procs and launcher.procs[pid].poll() is None
            if pid not in killed and alive and rnd <= len(launcher.reports(pid)) < launcher.cfg.federation.rounds:
                launcher.kill(pid)
                killed[pid] = rnd
        for pid in range(launcher.endpoints):
            led = launcher.state_dir(pid) / f"peer_{pid}.json"
            if led.is_file():
                try:
                    series.setdefault(pid, []).append(json.loads(led.read_text())["spent_epsilon"])
                except json.JSONDecodeError:  # never: ledgers are replaced atomically
                    series.setdefault(pid, []).append(float("nan"))

    t0 = time.perf_counter()
    summary = launch_federation(cfg, tmp / "run", state_root=tmp / "state", plot=False, on_poll=drill)
    wall = time.perf_counter() - t0
    ledgers_ok = all(PrivacyLedger.load(p) is not None for p in (tmp / "run" / "ledgers").glob("peer_*.json"))
    monotone = all(s == sorted(s) for s in series.values())
    resumed = {}
    for pid in killed:
        log = (tmp / "state" / f"peer_{pid:03d}" / "peer.log").read_text(errors="replace")
        found = re.findall(r"peer \d+ resumes after round (\d+)", log)
        resumed[str(pid)] = int(found[-1]) if found else None
    records = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    lost_groups = [
        {"round": r["round"], "aggregator": g["aggregator"], "missing": g.get("missing"), "aborted": g.get("aborted", False)}
        for r in records for g in r["groups"] if g.get("missing") or g.get("aborted")
    ]
    return {
        "kills": {str(p): r for p, r in killed.items()},
        "restarts": summary["restarts"],
        "rounds_completed": len(records),
        "rounds": args.rounds,
        "ledgers_verified": ledgers_ok,
        "ledgers_never_decreased": monotone,
        "resumed_after_round": resumed,
        "groups_with_missing_models": lost_groups,
        "global_acc": summary["mean_global_acc"],
        "wall_seconds": wall,
        "met": len(records) == args.rounds and ledgers_ok and monotone and all(v is not None for v in resumed.values()),
    }


def ckks(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    rows = []
    for model in ("mlp", "cnn-small"):
        for agg in ("none", "ckks"):
            cfg = config_from_dict({
                "federation": {"id": f"ckks-{model}", "peers": 7, "participants": 6, "groups": 1, "rounds": args.rounds},
                "data": {"name": "fashion-mnist", "partition": "iid", "max_train_samples": 7000,
                         "max_test_samples": 1000, "auditor_pool": 200},
                "models": {"mix": [model]},
                "dfml": {"ml_epochs": 1, "batch_size": 64},
                "crypto": {"secure_aggregation": agg},
            })
            name = f"{model}-{agg}"
            s, stamps, wall = _timed(
                lambda cb, cfg=cfg, name=name: launch_federation(
                    cfg, tmp / name, state_root=tmp / f"state-{name}", plot=False, on_round=cb
                )
            )
            recs = [json.loads(line) for line in (tmp / name / "metrics.jsonl").read_text().splitlines()]
            rows.append({
                "model": model, "exchange": "NaCl + CKKS" if agg == "ckks" else "NaCl",
                **_rates(stamps, wall, args.rounds),
                "crypto_seconds_per_round": s["crypto_seconds_per_round"],
                "bytes_per_round": s["bytes_per_round"],
                "secure_sums": sum(len(g.get("secure_sums", [])) for r in recs for g in r["groups"]),
                "global_acc": s["mean_global_acc"],
            })
            print(rows[-1], flush=True)
    for r in rows:
        base = next(b for b in rows if b["model"] == r["model"] and b["exchange"] == "NaCl")
        r["time_vs_nacl"] = r["median_round_seconds"] / base["median_round_seconds"]
    worst = max(r["time_vs_nacl"] for r in rows)
    return {"rows": rows, "worst_ratio": worst, "target": 1.5, "met": worst <= 1.5}


def _markdown(mode: str, res: dict[str, Any], args: argparse.Namespace) -> str:
    if mode == "throughput":
        lines = [
            f"# Peer processes vs in-process simulation (built-in federation, {args.rounds} rounds, 2 cores)", "",
            "| mode | rounds/min (steady) | rounds/min (end to end) | median s/round | wall s | global % |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in res["rows"]:
            lines.append(f"| {r['mode']} | {r['rounds_per_minute_steady']:.2f} | {r['rounds_per_minute_end_to_end']:.2f} | "
                         f"{r['median_round_seconds']:.1f} | {r['wall_seconds']:.0f} | {100 * r['global_acc']:.1f} |")
        lines += ["", f"Processes / in-process (steady): **{res['processes_vs_in_process']:.2f}x** (target >= 0.8: "
                  f"{'met' if res['met'] else 'NOT met'}); metrics identical: {res['metrics_identical']}."]
    elif mode == "faults":
        lines = [
            f"# Fault drill: 10 peer processes, {len(res['kills'])} killed and restarted ({res['rounds']} rounds)", "",
            f"- killed (peer: at the start of round): {res['kills']}; restarts: {res['restarts']}",
            f"- rounds completed: {res['rounds_completed']} of {res['rounds']}",
            f"- every ledger re-verified: {res['ledgers_verified']}; never decreased while running: {res['ledgers_never_decreased']}",
            f"- restarted peers resumed after round (from their checkpoints): {res['resumed_after_round']}",
            f"- groups that lost models: {res['groups_with_missing_models']}",
            f"- global accuracy {100 * res['global_acc']:.1f}%, wall {res['wall_seconds']:.0f} s",
            f"- target (nothing lost): {'met' if res['met'] else 'NOT met'}",
        ]
    else:
        lines = [
            f"# CKKS round vs NaCl-only round, 7 peer processes, 1 group of 6 ({args.rounds} rounds, Fashion-MNIST 28x28)", "",
            "| model | exchange | median s/round | time vs NaCl | crypto s/round (sum over peers) | MB/round | CKKS sums | global % |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in res["rows"]:
            lines.append(f"| {r['model']} | {r['exchange']} | {r['median_round_seconds']:.2f} | {r['time_vs_nacl']:.2f}x | "
                         f"{r['crypto_seconds_per_round']:.2f} | {r['bytes_per_round'] / 1e6:.1f} | {r['secure_sums']} | "
                         f"{100 * r['global_acc']:.1f} |")
        lines += ["", f"Worst CKKS / NaCl: **{res['worst_ratio']:.2f}x** (target <= 1.5: {'met' if res['met'] else 'NOT met'})."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("throughput", "faults", "ckks"), required=True)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--kills", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    args.rounds = args.rounds or {"throughput": 6, "faults": 8, "ckks": 4}[args.mode]
    torch.set_num_threads(1)
    os.environ.setdefault("SECURE_DFML_THREADS", "1")
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-peers-{args.mode}-"))
    try:
        res = {"throughput": throughput, "faults": faults, "ckks": ckks}[args.mode](args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    (args.out / f"peers_{args.mode}.json").write_text(json.dumps({"settings": settings, **res}, indent=2))
    md = _markdown(args.mode, res, args)
    (args.out / f"peers_{args.mode}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
