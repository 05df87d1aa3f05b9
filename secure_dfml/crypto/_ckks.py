"""CKKS secure group averaging (TenSEAL).

The roles, each a separate step of :class:`CKKSRoles` (peer nodes run only
their own and exchange the bytes as envelope messages, ``protocol/_secure.py``):

* **key holder** -- a peer that is neither the aggregator nor a contributor.
  It creates a *fresh* CKKS context, keeps the secret key, and publishes only
  the public context (public key and parameters; no secret, Galois or
  relinearisation keys: ciphertext + ciphertext and plaintext weighting need
  none of them).
* **contributors** -- each loads the public context from bytes, checks its
  own values fit, weights its flattened parameters by its share ``w_i / W`` in
  plaintext and encrypts them chunk by chunk (one ciphertext per
  ``poly_modulus_degree / 2`` values), packed with checked lengths.
* **aggregator** -- checks each incoming packed ciphertext list (untrusted
  bytes: sizes first, then parse, errors typed) and adds them.  It never holds
  a key that decrypts anything.
* **key holder** -- decrypts only the sum, quantises it (see below) and
  returns it to the aggregator.

:meth:`CKKSAverager.weighted_sum` runs all of them in one call (a reference
for tests and benchmarks) and counts every byte that would travel.

Release quantisation: the raw CKKS decryption carries the encryption noise,
and publishing it exactly enables the Li--Micciancio passive key-recovery
attack (EUROCRYPT 2021).  The key holder therefore rounds the average to a
power-of-two grid of about 2^-18 of its RMS before release (relative error
< 1.2e-6, far below the 1e-5 budget, and for typical weights ~1000x coarser
than the decryption noise).  This is a heuristic mitigation, not a
proof; the context is also fresh each round, so a recovered key would only
expose that round.  See SECURITY.md.
"""

from __future__ import annotations

import logging
import math
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from secure_dfml.crypto._errors import (
    CiphertextError,
    ContributionMismatchError,
    KeyHolderError,
    NotEnoughContributorsError,
    SecureAggregationError,
)

__all__ = ["CKKSAverager", "CKKSParams", "CKKSRoles", "SecureAverager", "SecureSum"]

logger = logging.getLogger(__name__)

_SECURE_DEGREES = {4096: 109, 8192: 218, 16384: 438, 32768: 881}  # max total coeff bits, 128-bit security


@dataclass(frozen=True, kw_only=True)
class CKKSParams:
    """CKKS parameters.

    Defaults: N = 8192 (4096 slots per ciphertext), coefficient moduli
    (60, 60) -- one 60-bit data prime plus the special prime, 120 bits in
    all, well inside the 218 bits allowed for 128-bit security at N = 8192 --
    and scale 2^45.  The error of a sum of ten fresh encryptions is about
    1e-10 (RMS; max ~1e-9) absolute, i.e. ~1e-9 relative for typical weights;
    magnitudes up to 2^(60-45-2) = 8192 fit (inputs are checked; senders
    encrypt ``w_i / sum(w)`` times their values, so the sum stays within the
    largest input).  A ciphertext at the data level is 2 x 8192 x 8 bytes
    = 128 KiB for 4096 values: 8x the float32 size.
    """

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 60)
    scale_bits: int = 45
    release_grid_bits: int = 18
    n_threads: int = 1

    def __post_init__(self) -> None:
        n = self.poly_modulus_degree
        if n not in _SECURE_DEGREES:
            raise SecureAggregationError(f"poly_modulus_degree = {n}: expected one of {sorted(_SECURE_DEGREES)}")
        bits = self.coeff_mod_bit_sizes
        if len(bits) < 2 or any(not 20 <= b <= 60 for b in bits):
            raise SecureAggregationError(
                f"coeff_mod_bit_sizes = {bits}: need >= 2 primes of 20..60 bits (data prime(s) + special prime)"
            )
        if sum(bits) > _SECURE_DEGREES[n]:
            raise SecureAggregationError(
                f"coeff_mod_bit_sizes sum to {sum(bits)} bits; N = {n} allows {_SECURE_DEGREES[n]} for 128-bit security"
            )
        if not 20 <= self.scale_bits <= bits[0] - 4:
            raise SecureAggregationError(
                f"scale_bits = {self.scale_bits}: expected 20..{bits[0] - 4} (first prime has {bits[0]} bits)"
            )
        if self.n_threads < 1:
            raise SecureAggregationError("n_threads must be >= 1")
        if not 8 <= self.release_grid_bits <= 40:
            raise SecureAggregationError("release_grid_bits must be in 8..40")

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def max_abs_value(self) -> float:
        """Largest magnitude a (weighted) value or the sum may have."""
        return float(2.0 ** (self.coeff_mod_bit_sizes[0] - self.scale_bits - 2))

    @property
    def max_ciphertext_bytes(self) -> int:
        """Upper bound accepted for one serialized ciphertext (checked before parsing)."""
        return 2 * self.poly_modulus_degree * 8 * (len(self.coeff_mod_bit_sizes) - 1) + 64 * 1024


@dataclass(frozen=True)
class SecureSum:
    """Result of a secure weighted sum: only the sum is ever decrypted.

    Defined here, beside the averager that produces it, so that the crypto
    package never imports the protocol it plugs into."""

    state_sum: dict[str, torch.Tensor]
    weight_sum: float
    bytes_moved: int
    crypto_seconds: float


class _FlatView:
    """Read [start, end) of a state's parameters as one flat float64 vector
    without materialising the whole flattened model."""

    def __init__(self, state: Mapping[str, torch.Tensor], names: Sequence[str]) -> None:
        self._tensors = [state[k].detach().reshape(-1) for k in names]
        self._offsets = np.cumsum([0] + [t.numel() for t in self._tensors])

    def read(self, start: int, end: int) -> np.ndarray:
        out = np.empty(end - start, dtype=np.float64)
        i = int(np.searchsorted(self._offsets, start, side="right")) - 1
        pos = start
        while pos < end:
            t = self._tensors[i]
            lo = pos - int(self._offsets[i])
            hi = min(t.numel(), end - int(self._offsets[i]))
            if hi > lo:
                out[pos - start : pos - start + hi - lo] = t[lo:hi].to(torch.float64).cpu().numpy()
                pos += hi - lo
            i += 1
        return out


@runtime_checkable
class SecureAverager(Protocol):
    """Averages same-architecture models without revealing any single one (in one call)."""

    name: str

    def min_contributors(self) -> int: ...

    def weighted_sum(
        self,
        contributions: Sequence[tuple[int, Mapping[str, torch.Tensor], float]],
        *,
        aggregator: int,
        key_holder: int,
        round_index: int,
    ) -> SecureSum: ...


class CKKSAverager:
    """:class:`SecureAverager` with CKKS.

    ``weighted_sum`` runs every role in-process but moves only serialized
    bytes between them, exactly what would travel between machines.
    """

    name = "ckks"

    def __init__(self, *, params: CKKSParams | None = None) -> None:
        self.params = params or CKKSParams()
        self.last_report: dict[str, Any] = {}

    def __repr__(self) -> str:
        p = self.params
        return f"CKKSAverager(N={p.poly_modulus_degree}, coeff_mod_bit_sizes={p.coeff_mod_bit_sizes}, scale=2^{p.scale_bits})"

    def min_contributors(self) -> int:
        return 2

    # -- validation -------------------------------------------------------------

    def _validate(
        self,
        contributions: Sequence[tuple[int, Mapping[str, torch.Tensor], float]],
        aggregator: int,
        key_holder: int,
    ) -> tuple[list[str], dict[str, tuple[tuple[int, ...], torch.dtype]], float]:
        ids = [int(c[0]) for c in contributions]
        if len(set(ids)) != len(ids):
            raise ContributionMismatchError(f"a peer contributes twice: {sorted(ids)}")
        others = [i for i in ids if i != aggregator]
        if len(others) < self.min_contributors():
            raise NotEnoughContributorsError(
                f"secure averaging needs at least {self.min_contributors()} contributors besides the aggregator "
                f"{aggregator}, got {len(others)} ({others}): the average would reveal an individual model"
            )
        if key_holder == aggregator:
            raise KeyHolderError(f"key holder {key_holder} is the aggregator: it could decrypt every contribution")
        if key_holder in ids:
            raise KeyHolderError(
                f"key holder {key_holder} is a contributor: it could subtract its own model from the sum"
            )
        first = contributions[0][1]
        names = list(first)
        if not names:
            raise ContributionMismatchError("contributions hold no tensors")
        layout = {k: (tuple(first[k].shape), first[k].dtype) for k in names}
        total_w = 0.0
        limit = self.params.max_abs_value
        for pid, state, weight in contributions:
            w = float(weight)
            if not math.isfinite(w) or w <= 0:
                raise ContributionMismatchError(f"peer {pid}: weight {weight!r} must be finite and > 0")
            total_w += w
            if set(state) != set(names):
                raise ContributionMismatchError(f"peer {pid}: tensor names differ from peer {ids[0]}'s")
            for k in names:
                t = state[k]
                if (tuple(t.shape), t.dtype) != layout[k]:
                    raise ContributionMismatchError(
                        f"peer {pid}: tensor {k!r} is {t.dtype}{list(t.shape)}, expected "
                        f"{layout[k][1]}{list(layout[k][0])}"
                    )
                if t.is_complex():
                    raise ContributionMismatchError(f"peer {pid}: tensor {k!r} is complex; not supported")
                tf = t.detach() if t.is_floating_point() else t.detach().to(torch.float64)
                if t.is_floating_point() and not bool(torch.isfinite(tf).all()):
                    raise ContributionMismatchError(f"peer {pid}: tensor {k!r} has NaN or Inf values")
                if tf.numel() and float(tf.abs().max()) > limit:
                    raise SecureAggregationError(
                        f"peer {pid}: tensor {k!r} has values beyond +-{limit:g}, too large for these CKKS parameters"
                    )
        if not math.isfinite(total_w):
            raise ContributionMismatchError("sum of weights is not finite")
        return names, layout, total_w

    # -- the protocol -------------------------------------------------------------

    def new_round_context(self) -> tuple[Any, bytes]:
        """What the key holder does first each round: a fresh CKKS context
        (kept secret) and its public serialization (public key and parameters
        only -- no secret, Galois or relinearisation keys)."""
        import tenseal as ts

        p = self.params
        secret_ctx = ts.context(
            ts.SCHEME_TYPE.CKKS,
            p.poly_modulus_degree,
            coeff_mod_bit_sizes=list(p.coeff_mod_bit_sizes),
            n_threads=p.n_threads,
        )
        secret_ctx.global_scale = 2.0**p.scale_bits
        public_bytes = secret_ctx.serialize(
            save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
        )
        return secret_ctx, public_bytes

    def weighted_sum(
        self,
        contributions: Sequence[tuple[int, Mapping[str, torch.Tensor], float]],
        *,
        aggregator: int,
        key_holder: int,
        round_index: int,
    ) -> SecureSum:
        """sum_i w_i * state_i and sum_i w_i, with only the sum ever decrypted
        (by ``key_holder``): every role of :class:`CKKSRoles` in one call, moving
        only the bytes that would travel between them (a reference for tests and
        benchmarks; peers run the roles as messages, ``protocol/_secure.py``).
        Floating tensors come back in their dtype; other dtypes as float64."""
        t_start = time.perf_counter()
        contributions = list(contributions)
        names, layout, total_w = self._validate(contributions, aggregator, key_holder)
        roles = CKKSRoles(self.params)
        numel = int(sum(math.prod(layout[k][0]) for k in names))
        secret_ctx, public = roles.new_context()  # key holder
        payloads = {  # each contributor, from the public bytes only
            pid: roles.encrypt(roles.load_context(public, pid), state, names, float(w) / total_w, pid)
            for pid, state, w in contributions
        }
        agg_ctx = roles.load_context(public, aggregator)  # aggregator: untrusted bytes in, the sum out
        for pid, data in payloads.items():
            roles.check_ciphertexts(agg_ctx, data, numel, pid)
        summed = roles.add(agg_ctx, payloads, numel)
        average = roles.decrypt_sum(secret_ctx, summed, numel, aggregator)  # key holder: only the sum
        state_sum: dict[str, torch.Tensor] = {}
        offset = 0
        for k in names:
            shape, dtype = layout[k]
            n = math.prod(shape)
            vals = torch.from_numpy(average[offset : offset + n] * total_w).reshape(shape)
            state_sum[k] = vals.to(dtype if dtype.is_floating_point else torch.float64)
            offset += n
        counts = {
            "context": len(public) * (len(payloads) + 1),  # to every contributor and the aggregator
            "ciphertexts": sum(map(len, payloads.values())),
            "sums": len(summed),
            "result": 8 * numel,  # the released sum, float64, back to the aggregator
        }
        bytes_moved = sum(counts.values())
        seconds = time.perf_counter() - t_start
        self.last_report = {
            "round": round_index, "aggregator": aggregator, "key_holder": key_holder,
            "contributors": list(payloads), "parameters": numel, "ciphertexts_per_sender": roles.chunks(numel),
            "bytes": counts, "seconds": seconds,
        }
        logger.debug("CKKS round %d: %d contributors, %d values, %d bytes, %.3f s", round_index, len(payloads), numel,
                     bytes_moved, seconds)
        return SecureSum(state_sum=state_sum, weight_sum=total_w, bytes_moved=bytes_moved, crypto_seconds=seconds)


# -- the roles as separate steps (a peer node runs only its own) ------------------------

_PACK_MAGIC = b"CKV1"


def _pack(parts: Sequence[bytes]) -> bytes:
    return b"".join([_PACK_MAGIC, struct.pack("!I", len(parts)), *(struct.pack("!I", len(x)) + x for x in parts)])


def _unpack(data: bytes, expected: int, limit: int, peer_id: int) -> list[bytes]:
    """Split a packed list of ``expected`` ciphertexts (each at most ``limit``
    bytes) -- checked lengths only, nothing deserialized."""
    if len(data) < 8 or data[:4] != _PACK_MAGIC:
        raise CiphertextError(f"payload from peer {peer_id} is not a packed ciphertext list", peer_id=peer_id)
    (count,) = struct.unpack("!I", data[4:8])
    if count != expected:
        raise CiphertextError(f"peer {peer_id} sent {count} ciphertexts, expected {expected}", peer_id=peer_id)
    out, pos = [], 8
    for _ in range(count):
        if pos + 4 > len(data):
            raise CiphertextError(f"payload from peer {peer_id} is truncated", peer_id=peer_id)
        (n,) = struct.unpack("!I", data[pos : pos + 4])
        if n > limit or pos + 4 + n > len(data):
            raise CiphertextError(f"ciphertext from peer {peer_id} of {n} bytes is oversized or truncated", peer_id=peer_id)
        out.append(data[pos + 4 : pos + 4 + n])
        pos += 4 + n
    if pos != len(data):
        raise CiphertextError(f"payload from peer {peer_id} has trailing bytes", peer_id=peer_id)
    return out


class CKKSRoles:
    """CKKS secure averaging split into what each role does, for peers that
    exchange the bytes as protocol messages (contexts, ciphertexts, the sum and
    the released average each travel in an envelope):

    * key holder: :meth:`new_context` -> send the public bytes to the
      contributors and the aggregator; later :meth:`decrypt_sum` on the sum it
      receives and send back the released (quantised) vector;
    * contributor: :meth:`load_context`, :meth:`encrypt` its own model scaled by
      its weight share;
    * aggregator: :meth:`load_context`, :meth:`add` the ciphertexts that arrived.
    """

    def __init__(self, params: CKKSParams | None = None) -> None:
        self.params = params or CKKSParams()

    def chunks(self, numel: int) -> int:
        return -(-numel // self.params.slots)

    def new_context(self) -> tuple[Any, bytes]:
        return CKKSAverager(params=self.params).new_round_context()

    def load_context(self, data: bytes, peer_id: int) -> Any:
        return _load_public_context(data, peer_id, self.params)

    def encrypt(self, ctx: Any, state: Mapping[str, torch.Tensor], names: Sequence[str], scale: float, peer_id: int) -> bytes:
        """This contributor's ``scale * state`` (flattened in ``names`` order) as
        packed ciphertexts; refuses values CKKS cannot carry."""
        import tenseal as ts

        limit = self.params.max_abs_value
        for k in names:
            t = state[k].detach()
            tf = t if t.is_floating_point() else t.to(torch.float64)
            if not bool(torch.isfinite(tf).all()):
                raise ContributionMismatchError(f"peer {peer_id}: tensor {k!r} has NaN or Inf values")
            if tf.numel() and float(tf.abs().max()) > limit:
                raise SecureAggregationError(
                    f"peer {peer_id}: tensor {k!r} has values beyond +-{limit:g}, too large for these CKKS parameters"
                )
        view = _FlatView(state, names)
        numel = int(sum(state[k].numel() for k in names))
        slots = self.params.slots
        parts = [ts.ckks_vector(ctx, view.read(lo, min(numel, lo + slots)) * scale).serialize() for lo in range(0, numel, slots)]
        return _pack(parts)

    def add(self, ctx: Any, payloads: Mapping[int, bytes], numel: int) -> bytes:
        """The aggregator's sum of the contributors' packed ciphertexts (validated
        as untrusted bytes), packed for the key holder."""
        import tenseal as ts

        p = self.params
        sizes = [min(p.slots, numel - lo) for lo in range(0, numel, p.slots)]
        acc: list[Any] = [None] * len(sizes)
        for pid, data in payloads.items():
            for j, part in enumerate(_unpack(data, len(sizes), p.max_ciphertext_bytes, pid)):
                vec = _load_ciphertext(ts, ctx, part, sizes[j], pid, p)
                if acc[j] is None:
                    acc[j] = vec
                else:
                    try:
                        acc[j].add_(vec)
                    except Exception as exc:  # noqa: BLE001 - untrusted input, typed below
                        raise CiphertextError(f"ciphertext from peer {pid} cannot be added ({exc})", peer_id=pid) from None
        return _pack([a.serialize() for a in acc])

    def check_ciphertexts(self, ctx: Any, data: bytes, numel: int, peer_id: int) -> bytes:
        """Accept ``data`` only if it parses as this context's packed ciphertexts of ``numel`` values."""
        import tenseal as ts

        p = self.params
        sizes = [min(p.slots, numel - lo) for lo in range(0, numel, p.slots)]
        for j, part in enumerate(_unpack(data, len(sizes), p.max_ciphertext_bytes, peer_id)):
            _load_ciphertext(ts, ctx, part, sizes[j], peer_id, p)
        return data

    def decrypt_sum(self, secret_ctx: Any, data: bytes, numel: int, peer_id: int) -> np.ndarray:
        """Key holder: decrypt only the sum and round it to the release grid."""
        import tenseal as ts

        p = self.params
        sizes = [min(p.slots, numel - lo) for lo in range(0, numel, p.slots)]
        out = np.empty(numel, dtype=np.float64)
        for j, part in enumerate(_unpack(data, len(sizes), p.max_ciphertext_bytes, peer_id)):
            vec = _load_ciphertext(ts, secret_ctx, part, sizes[j], peer_id, p)
            out[j * p.slots : j * p.slots + sizes[j]] = np.asarray(vec.decrypt(), dtype=np.float64)
        return _quantise(out, p.release_grid_bits)


def _load_public_context(data: bytes, peer_id: int, p: CKKSParams) -> Any:
    import tenseal as ts

    try:
        ctx = ts.context_from(data, n_threads=p.n_threads)
    except Exception as exc:  # noqa: BLE001 - untrusted bytes
        raise CiphertextError(f"peer {peer_id} cannot parse the public CKKS context ({exc})", peer_id=peer_id) from None
    if ctx.is_private() or ctx.has_galois_keys() or ctx.has_relin_keys():
        # Never happens with our key holder; refuse rather than hold key material we should not.
        raise CiphertextError("the shared CKKS context carries more than the public key", peer_id=peer_id)
    return ctx


def _load_ciphertext(ts: Any, ctx: Any, data: bytes, expected_size: int, peer_id: int, p: CKKSParams) -> Any:
    if not isinstance(data, bytes) or len(data) > p.max_ciphertext_bytes:
        raise CiphertextError(
            f"ciphertext from peer {peer_id} is {len(data)} bytes, above the limit {p.max_ciphertext_bytes}",
            peer_id=peer_id,
        )
    try:
        vec = ts.ckks_vector_from(ctx, data)
        size = vec.size()
    except Exception as exc:  # noqa: BLE001 - TenSEAL raises ValueError/RuntimeError/...; all typed here
        raise CiphertextError(f"malformed ciphertext from peer {peer_id} ({exc})", peer_id=peer_id) from None
    if size != expected_size:
        raise CiphertextError(
            f"ciphertext from peer {peer_id} holds {size} values, expected {expected_size}", peer_id=peer_id
        )
    return vec


def _quantise(values: np.ndarray, grid_bits: int) -> np.ndarray:
    """Round to a power-of-two grid ~2^-grid_bits of the RMS (see module doc)."""
    if values.size == 0:
        return values
    rms = float(np.sqrt(np.mean(np.square(values))))
    if not math.isfinite(rms) or rms == 0.0:
        return values
    step = 2.0 ** (math.floor(math.log2(rms)) - grid_bits)
    return np.round(values / step) * step
