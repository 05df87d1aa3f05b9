"""Large federations: seconds per round, peak memory, memory per idle peer (issue 13).

The built-in federation (Fashion-MNIST-mini, scatter-linear / scatter-cnn /
scatter-mlp cycled over the peers) with 100, 300 and 1,000 peers, the same
participants per round (10, in 2 groups of 5), privacy off (the measurement
the issue started from) or on (``--dp``), evaluation on a public sample of
``--eval-peers`` peers per round (all peers in the last round), in process
and on a local Ray. Each configuration runs in a fresh subprocess so its peak
memory is its own (the resident memory of its whole process tree, Ray's
processes included, sampled every 0.2 s).

Every federation gets 60 training images per peer (``data.max_train_samples``
= 60 x peers, all 60,000 at 1,000 peers), so a peer holds the same data at
every size. Memory per idle peer: the slope of the memory after building the
federation against the number of peers (between the smallest and largest
federation), next to a peer's parameter bytes plus its data bytes. Targets: memory linear
in peers; 1,000 peers within 8 GB; an idle peer at most 2x its parameter plus
data bytes; seconds per round at 1,000 peers within 1.2x of those at 100.

    python benchmarks/bench_scale.py [--peers 100,300,1000] [--backends inprocess,ray] [--rounds 3] [--dp]

Writes benchmarks/results/scale.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
PER_PEER_SAMPLES = 60  # training images per peer before the split (Fashion-MNIST-mini has 60,000: 1,000 peers)


# ----------------------------------------------------------------------------- memory of a process tree
def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                out += [int(c) for c in fh.read().split()]
    except OSError:
        pass
    return out


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_rss(root: int) -> int:
    seen, stack, total = set(), [root], 0
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += _rss(pid)
        stack += _children(pid)
    return total


class PeakSampler:
    def __init__(self, root: int, every: float = 0.2) -> None:
        self.root, self.every, self.peak = root, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.root))
            self._stop.wait(self.every)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_rss(self.root))


# ----------------------------------------------------------------------------- one configuration (child)
def one(peers: int, backend: str, rounds: int, dp: bool, eval_peers: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    from secure_dfml import config_from_dict, default_config
    from secure_dfml._run import build_federation
    from secure_dfml.models import count_parameters

    raw = default_config().to_dict()
    raw["federation"].update(peers=peers, participants=10, groups=2, rounds=rounds, eval_peers=eval_peers)
    raw["data"]["max_train_samples"] = min(60_000, PER_PEER_SAMPLES * peers)  # the same data per peer at every size
    if not dp:
        raw["privacy"] = {"enabled": False}
    cfg = config_from_dict(raw)
    me = os.getpid()
    base = tree_rss(me)
    out: dict[str, Any] = {"peers": peers, "backend": backend, "rounds": rounds, "dp": dp, "eval_peers": eval_peers}
    with PeakSampler(me) as peak:
        if backend == "inprocess":
            t0 = time.perf_counter()
            fed = build_federation(cfg, ledger_dir=Path(tempfile.mkdtemp()) if dp else None, keep_training_records=False)
            out["build_seconds"] = time.perf_counter() - t0
            out["rss_after_build"] = tree_rss(me)
            param = [4 * count_parameters(p.model) for p in fed.peers]
            data = [sum(t.numel() * t.element_size() for t in (p.x_train, p.y_train, p.x_local_test, p.y_local_test))
                    for p in fed.peers]
            out["param_bytes_per_peer"] = sum(param) / len(param)
            out["data_bytes_per_peer"] = sum(data) / len(data)
            secs = []
            t_prev = time.perf_counter()
            for record in fed.rounds():  # wall time per round, evaluation included
                now = time.perf_counter()
                secs.append(now - t_prev)
                t_prev = now
                out.setdefault("evaluated_per_round", []).append(len([e for e in record["peers"].values()
                                                                      if "global_acc" in e]))
            out["round_seconds"] = secs
        else:
            from secure_dfml.orchestration.ray_backend import run_federation_ray

            stamps: list[float] = []
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                run_federation_ray(cfg, Path(tmp) / "run", plot=False, peers_per_actor=max(1, peers // 4),
                                   on_round=lambda r: stamps.append(time.perf_counter()))
                out["wall_seconds"] = time.perf_counter() - t0
            secs = [b - a for a, b in zip(stamps, stamps[1:])]  # wall time between rounds (start-up excluded)
            out["round_seconds"] = secs
    out["peak_rss"] = peak.peak
    out["base_rss"] = base
    # steady state: rounds after the first (the first warms caches); the last evaluates everyone
    steady = secs[1:-1] if len(secs) > 2 else secs
    out["last_round_seconds"] = secs[-1]
    out["seconds_per_round"] = sum(steady) / len(steady)
    return out


# ----------------------------------------------------------------------------- driver
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", default="100,300,1000")
    ap.add_argument("--backends", default="inprocess,ray")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--eval-peers", type=int, default=10)
    ap.add_argument("--dp", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--one", nargs=2, metavar=("PEERS", "BACKEND"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(int(args.one[0]), args.one[1], args.rounds, args.dp, args.eval_peers)))
        return
    rows: list[dict[str, Any]] = []
    for backend in args.backends.split(","):
        for n in (int(x) for x in args.peers.split(",")):
            cmd = [sys.executable, __file__, "--one", str(n), backend, "--rounds", str(args.rounds),
                   "--eval-peers", str(args.eval_peers)] + (["--dp"] if args.dp else [])
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                rows.append({"peers": n, "backend": backend, "error": proc.stderr.strip().splitlines()[-1:]})
                print(f"{backend} {n}: FAILED {proc.stderr[-2000:]}", flush=True)
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["process_seconds"] = time.perf_counter() - t0
            rows.append(row)
            print(f"{backend} {n}: {row['seconds_per_round']:.2f} s/round, peak {row['peak_rss'] / 2**30:.2f} GiB",
                  flush=True)
    ok = [r for r in rows if "error" not in r]
    summary: dict[str, Any] = {}
    for backend in {r["backend"] for r in ok}:
        rs = sorted((r for r in ok if r["backend"] == backend), key=lambda r: r["peers"])
        small, big = rs[0], rs[-1]
        s = {"round_seconds_ratio_largest_vs_smallest": big["seconds_per_round"] / small["seconds_per_round"],
             "peak_rss_largest_gib": big["peak_rss"] / 2**30}
        if backend == "inprocess" and big["peers"] > small["peers"]:
            slope = (big["rss_after_build"] - small["rss_after_build"]) / (big["peers"] - small["peers"])
            s["memory_per_idle_peer_bytes"] = slope
            s["param_plus_data_bytes_per_peer"] = big["param_bytes_per_peer"] + big["data_bytes_per_peer"]
            s["idle_peer_ratio"] = slope / s["param_plus_data_bytes_per_peer"]
        if big["peers"] > small["peers"]:  # every byte the whole process tree holds, per added peer
            s["peak_memory_per_added_peer_bytes"] = (big["peak_rss"] - small["peak_rss"]) / (big["peers"] - small["peers"])
        summary[backend] = s
    result = {"settings": vars(args) | {"out": str(args.out)}, "rows": rows, "summary": summary}
    result["settings"].pop("one", None)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "scale_dp" if args.dp else "scale"
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Large federations ({'DP' if args.dp else 'privacy off'}; 10 participants per round in 2 groups; "
             f"evaluation on {args.eval_peers} sampled peers per round, all in the last; {args.rounds} rounds)", "",
             "| backend | peers | s/round (steady) | peak memory GiB | param + data bytes per peer |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['backend']} | {r['peers']} | failed: {r['error']} | | |")
            continue
        pd = (f"{r['param_bytes_per_peer'] + r['data_bytes_per_peer']:,.0f}" if "param_bytes_per_peer" in r else "")
        lines.append(f"| {r['backend']} | {r['peers']} | {r['seconds_per_round']:.2f} | {r['peak_rss'] / 2**30:.2f} | {pd} |")
    lines.append("")
    for backend, s in sorted(summary.items()):
        lines.append(f"- {backend}: s/round at the largest vs the smallest federation "
                     f"{s['round_seconds_ratio_largest_vs_smallest']:.2f}x (target <= 1.2x); peak "
                     f"{s['peak_rss_largest_gib']:.2f} GiB at the largest (target <= 8 GB at 1,000 peers); peak memory "
                     f"per added peer {s.get('peak_memory_per_added_peer_bytes', float('nan')):,.0f} B"
                     + (f"; memory per idle peer {s['memory_per_idle_peer_bytes']:,.0f} B = "
                        f"{s['idle_peer_ratio']:.2f}x its parameter + data bytes (target <= 2x)"
                        if "idle_peer_ratio" in s else ""))
    lines.append("")
    (args.out / f"{name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
