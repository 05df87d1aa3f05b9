"""Certification of the built-in run: wall time and what dominates it; canary audit strength.

1. Train the built-in federation (DP, epsilon 8, NaCl envelopes) into a fresh run directory.
2. ``certify --run-audits`` against the shipped ``factory`` profile: the audits it
   needs (final-model, eavesdropper, the canary audit sized for ``min_strength``)
   are run, then the certificate is written; each step is timed.
3. ``certify`` again with every audit present (the cost of certification alone) and ``verify``.
4. The canary audit of the same federation without DP: its lower bound against its
   attainable maximum, next to the DP run's.

Writes benchmarks/results/certify.{json,md}.

    python benchmarks/bench_certify.py [--canaries 100] [--rounds N] [--profile factory]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from secure_dfml import config_from_dict, default_config, run_federation
from secure_dfml.certify import certify, load_requirements, load_signing_key, verify, write_auditor_key
from secure_dfml.orchestration.canary import canary_dir, run_canary_audit
from secure_dfml.orchestration.certification import AuditStep, certify_with_audits

RESULTS = Path(__file__).resolve().parent / "results"


def _canary_row(res: dict[str, Any], label: str) -> dict[str, Any]:
    pooled = res["pooled"]
    peers = res["peers"].values()
    return {
        "run": label,
        "private": res["private"],
        "canaries": pooled["canaries"],
        "kind": res.get("canary_kind"),
        "pooled_lower_bound": pooled["epsilon_lower_bound"],
        "pooled_attainable": pooled["attainable_epsilon"],
        "guesses": pooled["r"],
        "correct": pooled["v"],
        "best_peer_lower_bound": max(e["epsilon_lower_bound"] for e in peers),
        "peer_attainable": max(e["attainable_epsilon"] for e in peers),
        "ledger_epsilon_max": pooled.get("ledger_epsilon"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--canaries", type=int, default=None, help="canaries per peer (default: as --run-audits sizes it)")
    ap.add_argument("--rounds", type=int, default=None, help="override federation.rounds (default: the built-in 20)")
    ap.add_argument("--profile", default="factory")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    raw = default_config().to_dict()
    if args.rounds is not None:
        raw["federation"]["rounds"] = args.rounds
    cfg = config_from_dict(raw)
    req = load_requirements(args.profile)
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-certify-") as tmp:
        run_dir, aud = Path(tmp) / "run", Path(tmp) / "auditor"
        t0 = time.perf_counter()
        run_federation(cfg, run_dir, plot=False)
        timings["train (not part of certify)"] = time.perf_counter() - t0
        write_auditor_key(aud)
        key = load_signing_key(aud / "auditor.key")
        if args.canaries is not None:  # an explicit canary count: run it before certify finds none
            t0 = time.perf_counter()
            run_canary_audit(cfg, canaries_per_peer=args.canaries, rng=np.random.default_rng(1), out_dir=canary_dir(run_dir))
            timings[f"audit: canary ({args.canaries} per peer)"] = time.perf_counter() - t0
        marks: list[tuple[str, float]] = []

        def on_step(step: AuditStep) -> None:
            what = f"canary ({step.canaries_per_peer} per peer)" if step.kind == "canary" else step.name
            marks.append((f"audit: {what}", time.perf_counter()))

        t0 = time.perf_counter()
        cert, _steps = certify_with_audits(run_dir, req, key, rng=np.random.default_rng(0), on_step=on_step)
        end = time.perf_counter()
        stamps = [m[1] for m in marks] + [end]
        for (name, start), stop in zip(marks, stamps[1:]):
            timings[name] = stop - start
        timings["certify --run-audits, total"] = end - t0
        t0 = time.perf_counter()
        again = certify(run_dir, req, key)
        timings["certify with every audit present"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        checked = verify(run_dir / "certificate.json", aud / "auditor.pub", run_dir)
        timings["verify (re-hash every artifact)"] = time.perf_counter() - t0
        dp_canary = json.loads((canary_dir(run_dir) / "canary.json").read_text())
        m = int(dp_canary["canaries_per_peer"])
        raw_np = json.loads(json.dumps(raw))
        raw_np["privacy"] = {"enabled": False}
        t0 = time.perf_counter()
        np_canary = run_canary_audit(config_from_dict(raw_np), canaries_per_peer=m, rng=np.random.default_rng(1),
                                     out_dir=Path(tmp) / "canary-non-private")
        timings[f"canary audit, non-private twin ({m} per peer; not part of certify)"] = time.perf_counter() - t0
        files = len(again["manifest"]["files"])
    result = {
        "settings": {"profile": req.name, "rounds": cfg.federation.rounds, "peers": cfg.federation.peers,
                     "canaries_per_peer": m, "torch_threads": 1},
        "verdict": again["verdict"],
        "failed": [r for r in again["results"] if r["status"] != "PASS"],
        "verified": checked.ok,
        "files_hashed": files,
        "seconds": timings,
        "canary": [_canary_row(np_canary, "non-private"), _canary_row(dp_canary, f"DP, epsilon {cfg.privacy.epsilon:g}")],
        "target_non_private_lower_bound": 2.0,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "certify.json").write_text(json.dumps(result, indent=2) + "\n")
    audit_total = sum(v for k, v in timings.items() if k.startswith("audit:"))
    lines = [
        f"# certify on the built-in run ({cfg.federation.peers} peers, {cfg.federation.rounds} rounds, profile "
        f"`{req.name}`)", "",
        f"Verdict {again['verdict']}; verify {'OK' if checked.ok else 'FAILED'} ({files} files hashed).", "",
        "| step | seconds |", "|---|---:|",
        *(f"| {k} | {v:.1f} |" for k, v in timings.items()), "",
        f"The audits take {audit_total:.0f} s of certify --run-audits' {timings['certify --run-audits, total']:.0f} s; "
        f"certifying with every audit present takes {timings['certify with every audit present']:.1f} s.", "",
        "## Canary audit strength", "",
        "| run | canaries (kind) | guesses | correct | pooled lower bound | attainable | best peer | peer attainable | "
        "largest ledger eps |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["canary"]:
        led = "inf" if row["ledger_epsilon_max"] is None else f"{row['ledger_epsilon_max']:.2f}"
        lines.append(f"| {row['run']} | {row['canaries']} ({row['kind']}) | {row['guesses']} | {row['correct']} | "
                     f"{row['pooled_lower_bound']:.2f} | {row['pooled_attainable']:.2f} | "
                     f"{row['best_peer_lower_bound']:.2f} | {row['peer_attainable']:.2f} | {led} |")
    lines += ["", f"Target: a non-private peer's lower bound >= {result['target_non_private_lower_bound']:g} "
              f"({'met' if result['canary'][0]['pooled_lower_bound'] >= 2.0 else 'not met'}).", ""]
    (args.out / "certify.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
