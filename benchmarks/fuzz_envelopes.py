"""Seeded mutation fuzz of the envelope receiver.

    python benchmarks/fuzz_envelopes.py [--count 10000] [--seed 0] [--seeds 5]

Feeds --count mutants per seed (bit flips, byte substitutions, truncations,
insertions, deletions, splices of two valid envelopes, signature swaps,
header field rewrites) to NaClChannel.open.  Success means zero accepted,
zero untyped exceptions, unchanged replay state, and every original envelope
still accepted afterwards.  Writes fuzz_envelopes.json to --out; exits 1 on
any finding.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from secure_dfml.crypto._fuzz import run_envelope_fuzz


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, default=1, help="run seeds seed, seed+1, ...")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    reports = [run_envelope_fuzz(args.count, seed=s).to_dict() for s in range(args.seed, args.seed + args.seeds)]
    for r in reports:
        print(
            f"seed {r['seed']}: {r['count']} mutants in {r['seconds']} s, accepted {r['accepted']}, "
            f"crashes {r['crashes']}, state unchanged {r['state_unchanged']}, "
            f"originals still open {r['originals_still_open']}; rejections {r['rejections']}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fuzz_envelopes.json").write_text(json.dumps(reports, indent=2) + "\n")
    if not all(r["ok"] for r in reports):
        sys.exit(1)


if __name__ == "__main__":
    main()
