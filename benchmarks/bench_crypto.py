"""Envelope seal+open throughput vs raw crypto_box, same run, same machine.

    python benchmarks/bench_crypto.py [--sizes-mb 1 4 16 64] [--out benchmarks/results]

For each payload size, every repetition times, back to back:
  raw:      nacl.public.Box.encrypt + Box.decrypt (precomputed shared key)
  envelope: NaClChannel.seal + NaClChannel.open (default settings)
  content:  same with content_signature=True (BLAKE2b over the ciphertext)
  padded:   same with pad_messages=True (power-of-two buckets)
Throughput = payload bytes / (seal seconds + open seconds); the median over
repetitions is reported, with ratio = envelope / raw.  Writes
bench_crypto.json and bench_crypto.md to --out.
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

import nacl
import nacl.utils
from nacl.public import Box

from secure_dfml.crypto import NaClChannel, generate_keys

MB = 1024 * 1024


def _reps(size_mb: int) -> int:
    return max(5, min(40, 64 // size_mb * 2))


def bench(sizes_mb: list[int]) -> dict:
    keyring = generate_keys(2, "bench-federation")
    a, b = keyring.identity(0), keyring.identity(1)
    box_ab = Box(a.box_key, b.box_public_key)
    box_ba = Box(b.box_key, a.box_public_key)
    limit = 2 * max(sizes_mb) * MB + (1 << 20)
    channels = {
        "envelope": NaClChannel(keyring=keyring, max_message_bytes=limit),
        "content": NaClChannel(keyring=keyring, max_message_bytes=limit, content_signature=True),
        "padded": NaClChannel(keyring=keyring, max_message_bytes=limit, pad_messages=True),
    }
    rows = []
    round_index = 0
    for size_mb in sizes_mb:
        payload = nacl.utils.random(size_mb * MB)
        times: dict[str, list[float]] = {k: [] for k in ("raw", *channels)}
        wire: dict[str, int] = {}
        # warm-up (page faults, caches)
        box_ba.decrypt(box_ab.encrypt(payload))
        for rep in range(_reps(size_mb)):
            t0 = time.perf_counter()
            ct = box_ab.encrypt(payload)
            pt = box_ba.decrypt(ct)
            times["raw"].append(time.perf_counter() - t0)
            assert pt == payload
            del ct, pt
            for name, ch in channels.items():
                round_index += 1
                ctx = {"sender": 0, "recipient": 1, "round_index": round_index, "kind": "model"}
                t0 = time.perf_counter()
                env = ch.seal(payload, **ctx)
                out = ch.open(env, **ctx)
                times[name].append(time.perf_counter() - t0)
                assert out == payload
                wire[name] = len(env)
                del env, out
        med = {k: statistics.median(v) for k, v in times.items()}
        gbps = {k: size_mb * MB / 1e9 / v for k, v in med.items()}
        rows.append(
            {
                "payload_mb": size_mb,
                "repetitions": len(times["raw"]),
                "median_seconds": med,
                "gb_per_s": gbps,
                "ratio_vs_raw": {k: gbps[k] / gbps["raw"] for k in channels},
                "wire_bytes": wire,
            }
        )
        print(
            f"{size_mb:>3} MB  raw {gbps['raw']:.3f} GB/s  envelope {gbps['envelope']:.3f} "
            f"({gbps['envelope'] / gbps['raw']:.2f}x)  content-sig {gbps['content'] / gbps['raw']:.2f}x  "
            f"padded {gbps['padded'] / gbps['raw']:.2f}x",
            file=sys.stderr,
        )
    return {
        "benchmark": "envelope seal+open vs raw crypto_box (Box.encrypt + Box.decrypt)",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "pynacl": nacl.__version__,
        },
        "rows": rows,
    }


def to_markdown(result: dict) -> str:
    lines = [
        "| payload | raw crypto_box | envelope (default) | ratio | content-signature | ratio | padded | ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        g, q = r["gb_per_s"], r["ratio_vs_raw"]
        lines.append(
            f"| {r['payload_mb']} MB | {g['raw']:.3f} GB/s | {g['envelope']:.3f} GB/s | {q['envelope']:.2f}x | "
            f"{g['content']:.3f} GB/s | {q['content']:.2f}x | {g['padded']:.3f} GB/s | {q['padded']:.2f}x |"
        )
    m = result["machine"]
    lines.append("")
    lines.append(
        f"Throughput = payload / (seal + open) (raw: encrypt + decrypt), median of repetitions; "
        f"{m['processor']}, {m['cpus']} CPUs, Python {m['python']}, PyNaCl {m['pynacl']}. "
        "Padded: payloads of exactly 2^k MB are the worst case for power-of-two buckets "
        "(payload + 8-byte trailer rounds up to 2x), so that column moves twice the bytes."
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mb", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    result = bench(args.sizes_mb)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_crypto.json").write_text(json.dumps(result, indent=2) + "\n")
    md = to_markdown(result)
    (args.out / "bench_crypto.md").write_text(md)
    sys.stdout.write(md)


if __name__ == "__main__":
    main()
