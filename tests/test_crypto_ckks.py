"""CKKS secure group averaging: precision, refusals, key hygiene, accounting,
untrusted ciphertexts, and a 1M-parameter model."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import tenseal as ts
import torch
from torch import nn

from secure_dfml.crypto import (
    CiphertextError,
    CKKSAverager,
    CKKSParams,
    ContributionMismatchError,
    KeyHolderError,
    NotEnoughContributorsError,
    SecureAggregationError,
)
from secure_dfml.crypto._ckks import _load_ciphertext, _load_public_context
from secure_dfml.crypto import SecureAverager


def cnn_state(seed: int) -> dict[str, torch.Tensor]:
    """A realistic small CNN (GroupNorm, ~110k parameters), freshly initialised
    and nudged as if trained, so magnitudes are typical."""
    torch_gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.GroupNorm(4, 32), nn.ReLU(),
        nn.Conv2d(32, 64, 3), nn.GroupNorm(8, 64), nn.ReLU(),
        nn.Flatten(), nn.Linear(64 * 4 * 4, 96), nn.ReLU(), nn.Linear(96, 10),
    )  # fmt: skip
    state = {}
    for k, v in model.state_dict().items():
        noise = torch.randn(v.shape, generator=torch_gen) * 0.02
        state[k] = (v + noise).to(torch.float32)
    return state


def plain_average(contributions) -> dict[str, torch.Tensor]:
    total = sum(w for _, _, w in contributions)
    return {k: sum(s[k].double() * w for _, s, w in contributions) / total for k in contributions[0][1]}


def rel_error(result, contributions) -> float:
    ref = plain_average(contributions)
    got = {k: result.state_sum[k].double() / result.weight_sum for k in ref}
    num = math.sqrt(sum(float((got[k] - ref[k]).pow(2).sum()) for k in ref))
    den = math.sqrt(sum(float(ref[k].pow(2).sum()) for k in ref))
    return num / den


@pytest.fixture(scope="module")
def averager() -> CKKSAverager:
    return CKKSAverager()


def test_is_a_secure_averager(averager):
    assert isinstance(averager, SecureAverager) and averager.name == "ckks" and averager.min_contributors() == 2


@pytest.mark.parametrize("n_senders", [2, 4])
def test_equals_plaintext_average_within_1e5(averager, n_senders):
    contributions = [(pid, cnn_state(pid), float(500 + 700 * pid)) for pid in range(1, n_senders + 1)]
    result = averager.weighted_sum(contributions, aggregator=0, key_holder=9, round_index=3)
    assert result.weight_sum == pytest.approx(sum(w for *_, w in contributions))
    assert rel_error(result, contributions) < 1e-5
    for k, v in contributions[0][1].items():
        assert result.state_sum[k].shape == v.shape and result.state_sum[k].dtype == v.dtype


def test_large_and_mixed_magnitudes(averager):
    g = torch.Generator().manual_seed(5)
    contributions = [
        (pid, {"big": torch.randn(5000, generator=g) * 100, "tiny": torch.randn(300, generator=g) * 1e-3}, w)
        for pid, w in ((1, 1.0), (2, 3.0), (3, 60000.0))
    ]
    result = averager.weighted_sum(contributions, aggregator=0, key_holder=4, round_index=0)
    assert rel_error(result, contributions) < 1e-5


def test_refuses_fewer_than_two_contributors(averager):
    one = [(1, cnn_state(1), 10.0)]
    with pytest.raises(NotEnoughContributorsError):
        averager.weighted_sum(one, aggregator=0, key_holder=5, round_index=0)
    with pytest.raises(NotEnoughContributorsError):
        averager.weighted_sum([], aggregator=0, key_holder=5, round_index=0)
    # the aggregator's own model does not count as a second contributor
    with pytest.raises(NotEnoughContributorsError):
        averager.weighted_sum(one + [(0, cnn_state(0), 10.0)], aggregator=0, key_holder=5, round_index=0)


@pytest.mark.parametrize("key_holder", [0, 1, 2])
def test_refuses_key_holder_that_is_aggregator_or_contributor(averager, key_holder):
    two = [(1, cnn_state(1), 10.0), (2, cnn_state(2), 10.0)]
    with pytest.raises(KeyHolderError):
        averager.weighted_sum(two, aggregator=0, key_holder=key_holder, round_index=0)


def test_public_context_carries_no_secret(averager):
    secret_ctx, public_bytes = averager.new_round_context()
    assert secret_ctx.is_private()
    public = ts.context_from(public_bytes)
    assert not public.is_private() and not public.has_secret_key()
    assert not public.has_galois_keys() and not public.has_relin_keys()
    # fresh keys every round
    _, again = averager.new_round_context()
    assert again != public_bytes
    # and a context that does carry a secret is refused by peers
    with pytest.raises(CiphertextError):
        _load_public_context(secret_ctx.serialize(save_secret_key=True), 3, averager.params)


def test_bytes_moved_accounting(averager):
    contributions = [(pid, {"w": torch.full((10000,), 0.1 * pid)}, 1.0) for pid in (1, 2, 3)]
    result = averager.weighted_sum(contributions, aggregator=0, key_holder=7, round_index=1)
    rep = averager.last_report["bytes"]
    _, public_bytes = averager.new_round_context()
    n_ct = math.ceil(10000 / averager.params.slots)
    assert rep["context"] == pytest.approx(len(public_bytes) * 4, rel=0.05)  # 3 senders + aggregator
    assert rep["result"] == 10000 * 8  # the released sum travels as float64
    per_ct = rep["ciphertexts"] / (3 * n_ct)
    assert rep["sums"] == pytest.approx(per_ct * n_ct, rel=0.05)
    assert 100_000 < per_ct < averager.params.max_ciphertext_bytes
    assert result.bytes_moved == sum(rep.values())
    assert result.crypto_seconds > 0
    assert averager.last_report["ciphertexts_per_sender"] == n_ct


def test_invalid_contributions(averager):
    a = {"w": torch.ones(10)}
    cases = [
        [(1, a, 1.0), (1, a, 1.0)],  # duplicate peer
        [(1, a, 1.0), (2, {"v": torch.ones(10)}, 1.0)],  # names differ
        [(1, a, 1.0), (2, {"w": torch.ones(11)}, 1.0)],  # shape differs
        [(1, a, 1.0), (2, {"w": torch.ones(10, dtype=torch.float64)}, 1.0)],  # dtype differs
        [(1, a, 1.0), (2, {"w": torch.tensor([math.nan] * 10)}, 1.0)],
        [(1, a, 1.0), (2, a, 0.0)],
        [(1, a, 1.0), (2, a, math.inf)],
    ]
    for contributions in cases:
        with pytest.raises(ContributionMismatchError):
            averager.weighted_sum(contributions, aggregator=0, key_holder=5, round_index=0)
    with pytest.raises(SecureAggregationError):  # beyond the magnitude the parameters can hold
        averager.weighted_sum([(1, a, 1.0), (2, {"w": torch.full((10,), 1e6)}, 1.0)], aggregator=0, key_holder=5, round_index=0)


def test_untrusted_ciphertexts_raise_typed_errors(averager):
    p = averager.params
    _, public_bytes = averager.new_round_context()
    ctx = _load_public_context(public_bytes, 0, p)
    good = ts.ckks_vector(ctx, [0.5] * 100).serialize()
    other = ts.context(ts.SCHEME_TYPE.CKKS, 4096, coeff_mod_bit_sizes=[40, 40])
    other.global_scale = 2**30
    foreign = ts.ckks_vector(other, [1.0] * 100).serialize()
    for bad in (b"", b"garbage" * 50, good[:200], good[:-7], foreign, b"\x00" * (p.max_ciphertext_bytes + 1)):
        with pytest.raises(CiphertextError):
            _load_ciphertext(ts, ctx, bad, 100, 3, p)
    with pytest.raises(CiphertextError):  # right format, wrong number of values
        _load_ciphertext(ts, ctx, good, 101, 3, p)
    assert _load_ciphertext(ts, ctx, good, 100, 3, p).size() == 100
    with pytest.raises(CiphertextError):
        _load_public_context(b"not a context", 1, p)


def test_params_are_validated():
    for kwargs in (
        {"poly_modulus_degree": 1000},
        {"coeff_mod_bit_sizes": (60,)},
        {"coeff_mod_bit_sizes": (60, 60), "poly_modulus_degree": 4096},  # 120 > 109 bits
        {"scale_bits": 58},
    ):
        with pytest.raises(SecureAggregationError):
            CKKSParams(**kwargs)


def test_integer_and_double_tensors(averager):
    contributions = [
        (pid, {"count": torch.tensor([pid * 10, 7]), "d": torch.full((50,), 0.25 * pid, dtype=torch.float64)}, 1.0)
        for pid in (1, 2, 3)
    ]
    result = averager.weighted_sum(contributions, aggregator=0, key_holder=4, round_index=0)
    assert result.state_sum["count"].dtype == torch.float64 and result.state_sum["d"].dtype == torch.float64
    assert torch.allclose(result.state_sum["count"] / result.weight_sum, torch.tensor([20.0, 7.0], dtype=torch.float64))
    assert rel_error(result, contributions) < 1e-5


def test_a_vector_spanning_several_ciphertexts_is_summed_exactly_enough():
    contributions = [(pid, {"w": torch.linspace(-1, 1, 20000) * pid}, float(pid)) for pid in (1, 2)]
    result = CKKSAverager(params=CKKSParams()).weighted_sum(contributions, aggregator=0, key_holder=3, round_index=0)
    assert rel_error(result, contributions) < 1e-5


def test_one_million_parameters(averager):
    g = np.random.default_rng(0)
    n = 1_000_000
    contributions = [
        (pid, {"w": torch.from_numpy((g.standard_normal(n) * 0.05).astype(np.float32)).reshape(1000, 1000)}, w)
        for pid, w in ((1, 1200.0), (2, 800.0))
    ]
    t0 = time.perf_counter()
    result = averager.weighted_sum(contributions, aggregator=0, key_holder=3, round_index=0)
    elapsed = time.perf_counter() - t0
    assert rel_error(result, contributions) < 1e-5
    assert averager.last_report["ciphertexts_per_sender"] == math.ceil(n / averager.params.slots)
    assert elapsed < 300  # generous sanity bound, not a benchmark
