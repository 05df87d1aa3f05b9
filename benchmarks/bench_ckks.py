"""CKKS secure averaging: throughput per phase and ciphertext expansion.

    python benchmarks/bench_ckks.py [--params 100000 1000000] [--senders 3] [--repeats 2]

Runs CKKSAverager.weighted_sum on random float32 "models" (N(0, 0.05)) and
reports, from its per-phase timers (median over repeats):
  encrypt  : sender-side weighting + encryption + serialization, parameters/s (all senders)
  add      : aggregator-side deserialization + ciphertext addition, parameters/s (all senders)
  decrypt  : aggregator serialization of the sum + key-holder deserialization + decryption, parameters/s
  expansion: ciphertext bytes per sender / float32 bytes of the model
plus total seconds, bytes moved, and the plaintext weighted average time for scale.
Writes bench_ckks.json and bench_ckks.md to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import tenseal
import torch

from secure_dfml.crypto import CKKSAverager


def bench(param_counts: list[int], senders: int, repeats: int) -> dict:
    averager = CKKSAverager()
    p = averager.params
    rows = []
    rng = np.random.default_rng(0)
    for n in param_counts:
        contributions = [
            (pid, {"w": torch.from_numpy((rng.standard_normal(n) * 0.05).astype(np.float32))}, float(100 * pid))
            for pid in range(1, senders + 1)
        ]
        runs = []
        for _ in range(repeats):
            result = averager.weighted_sum(contributions, aggregator=0, key_holder=senders + 1, round_index=0)
            runs.append(dict(averager.last_report))
        total = sum(w for *_, w in contributions)
        plain_times = []
        for _ in range(3):
            t0 = time.perf_counter()
            plain = sum(s["w"].double() * w for _, s, w in contributions) / total
            plain_times.append(time.perf_counter() - t0)
        plain_seconds = min(plain_times)
        got = result.state_sum["w"].double() / result.weight_sum
        rel = float((got - plain).norm() / plain.norm())

        def med(key: str) -> float:
            return statistics.median(r["phase_seconds"][key] for r in runs)

        seconds = statistics.median(r["seconds"] for r in runs)
        b = runs[-1]["bytes"]
        ct_per_sender = b["ciphertexts"] / senders
        rows.append(
            {
                "parameters": n,
                "senders": senders,
                "ciphertexts_per_sender": runs[-1]["ciphertexts_per_sender"],
                "encrypt_params_per_s": senders * n / med("encrypt"),
                "add_params_per_s": senders * n / med("aggregate"),
                "decrypt_params_per_s": n / med("decrypt"),
                "context_seconds": med("context"),
                "total_seconds": seconds,
                "plaintext_average_seconds": plain_seconds,
                "expansion": ct_per_sender / (4 * n),
                "bytes": b,
                "bytes_moved": sum(b.values()),
                "relative_error": rel,
            }
        )
        r = rows[-1]
        print(
            f"{n:>9} params x {senders}: enc {r['encrypt_params_per_s'] / 1e6:.2f} M/s, add "
            f"{r['add_params_per_s'] / 1e6:.2f} M/s, dec {r['decrypt_params_per_s'] / 1e6:.2f} M/s, "
            f"expansion {r['expansion']:.2f}x, total {seconds:.2f} s, rel err {rel:.1e}",
            file=sys.stderr,
        )
    return {
        "benchmark": "CKKS secure weighted sum (TenSEAL)",
        "ckks": {
            "poly_modulus_degree": p.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(p.coeff_mod_bit_sizes),
            "scale_bits": p.scale_bits,
            "slots": p.slots,
        },
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "tenseal": tenseal.__version__,
        },
        "rows": rows,
    }


def to_markdown(result: dict) -> str:
    c = result["ckks"]
    lines = [
        "| parameters | senders | encrypt | add | decrypt | ciphertext expansion | bytes moved | total | plaintext avg | rel. error |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['parameters']:,} | {r['senders']} | {r['encrypt_params_per_s'] / 1e6:.2f} M/s | "
            f"{r['add_params_per_s'] / 1e6:.2f} M/s | {r['decrypt_params_per_s'] / 1e6:.2f} M/s | "
            f"{r['expansion']:.2f}x | {r['bytes_moved'] / 1e6:.1f} MB | {r['total_seconds']:.2f} s | "
            f"{r['plaintext_average_seconds'] * 1e3:.1f} ms | {r['relative_error']:.1e} |"
        )
    m = result["machine"]
    lines.append("")
    lines.append(
        f"CKKS N={c['poly_modulus_degree']}, coeff_mod_bit_sizes={c['coeff_mod_bit_sizes']}, scale 2^{c['scale_bits']}, "
        f"{c['slots']} slots/ciphertext; encrypt/add are parameters x senders per second; "
        f"{m['processor']}, {m['cpus']} CPUs, TenSEAL {m['tenseal']}."
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--senders", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    if args.senders < 2:
        ap.error("--senders must be >= 2 (secure averaging refuses fewer)")
    result = bench(args.params, args.senders, max(1, args.repeats))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_ckks.json").write_text(json.dumps(result, indent=2) + "\n")
    md = to_markdown(result)
    (args.out / "bench_ckks.md").write_text(md)
    sys.stdout.write(md)
    if any(r["relative_error"] >= 1e-5 for r in result["rows"]):
        sys.exit("relative error above 1e-5")


if __name__ == "__main__":
    main()
