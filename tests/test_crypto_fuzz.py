"""Seeded mutation fuzz of the envelope receiver: >= 10,000 mutants, zero
crashes (only typed CryptoError / CodecError), zero accepted, no state change.
The same harness runs from the command line: benchmarks/fuzz_envelopes.py."""

from __future__ import annotations

import pytest

from secure_dfml.crypto._fuzz import run_envelope_fuzz


def test_envelope_mutation_fuzz_10k():
    report = run_envelope_fuzz(10_000, seed=20240601)
    summary = report.to_dict()
    assert report.crashes == 0, summary["examples"]
    assert report.accepted == 0, summary["examples"]
    assert report.state_unchanged and report.originals_still_open
    assert sum(report.rejections.values()) == 10_000
    # every mutation family was exercised
    assert {"bitflip", "truncate", "insert", "splice", "sigswap"} <= set(report.operations)
    assert any(op.startswith("rewrite:") for op in report.operations)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_envelope_mutation_fuzz_more_seeds(seed):
    report = run_envelope_fuzz(20_000, seed=seed)
    assert report.ok, report.to_dict()
