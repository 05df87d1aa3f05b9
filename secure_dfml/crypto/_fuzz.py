"""Seeded mutation fuzzing of the envelope receiver (a self-test harness).

:func:`run_envelope_fuzz` seals a set of valid envelopes, then feeds the
receiver ``count`` mutants of them -- bit flips, byte substitutions,
truncations, insertions, deletions, splices of two valid envelopes, signature
swaps and header field rewrites (opened both with the original context and
with the context the rewritten header claims).  Every mutant must be refused
with a typed :class:`~secure_dfml.errors.CryptoError` /
:class:`~secure_dfml.errors.CodecError`: any acceptance or any other
exception is a finding.  Afterwards the receiver's replay state must be
unchanged and every original envelope must still open.

Used by ``tests/test_crypto_fuzz.py`` and ``benchmarks/fuzz_envelopes.py``.
"""

from __future__ import annotations

import random
import struct
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from secure_dfml.crypto._channel import NaClChannel
from secure_dfml.crypto._envelope import HEADER_BYTES
from secure_dfml.crypto._keys import KeyRing, generate_keys
from secure_dfml.errors import CodecError, CryptoError

__all__ = ["FuzzReport", "run_envelope_fuzz"]

# (name, offset, size) of header fields, see _envelope.py
_FIELDS = [
    ("magic", 0, 4),
    ("version", 4, 1),
    ("flags", 5, 1),
    ("reserved", 6, 2),
    ("federation", 8, 16),
    ("round", 24, 8),
    ("sender", 32, 4),
    ("recipient", 36, 4),
    ("kind", 40, 24),
    ("nonce", 64, 24),
    ("body_length", 88, 8),
]


@dataclass(frozen=True)
class _Base:
    envelope: bytes
    sender: int
    recipient: int
    round_index: int
    kind: str
    channel_index: int


@dataclass
class FuzzReport:
    count: int
    seed: int
    accepted: int = 0
    crashes: int = 0
    skipped_identical: int = 0
    rejections: Counter[str] = field(default_factory=Counter)
    operations: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    state_unchanged: bool = False
    originals_still_open: bool = False
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.accepted == 0 and self.crashes == 0 and self.state_unchanged and self.originals_still_open

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "seed": self.seed,
            "accepted": self.accepted,
            "crashes": self.crashes,
            "skipped_identical": self.skipped_identical,
            "rejections": dict(sorted(self.rejections.items())),
            "operations": dict(sorted(self.operations.items())),
            "state_unchanged": self.state_unchanged,
            "originals_still_open": self.originals_still_open,
            "seconds": round(self.seconds, 3),
            "examples": self.examples[:10],
            "ok": self.ok,
        }


def _make_bases(rng: random.Random, keyring: KeyRing) -> tuple[list[NaClChannel], list[_Base]]:
    # channel 0: plain envelopes (tag signature); 1: padded; 2: content signature
    variants = [
        NaClChannel(keyring=keyring, max_message_bytes=1 << 20),
        NaClChannel(keyring=keyring, max_message_bytes=1 << 20, pad_messages=True),
        NaClChannel(keyring=keyring, max_message_bytes=1 << 20, content_signature=True),
    ]
    bases: list[_Base] = []
    peers = keyring.directory.peer_ids
    kinds = ["model", "model-return", "ckks:ct", "x"]
    for i in range(12):
        ci = i % len(variants)
        sender, recipient = rng.sample(peers, 2)
        size = rng.choice([0, 1, 15, 16, 17, 100, 1000, 5000])
        payload = rng.randbytes(size)
        round_index = rng.choice([0, 1, 7, 2**40])
        kind = rng.choice(kinds)
        env = variants[ci].seal(payload, sender=sender, recipient=recipient, round_index=round_index, kind=kind)
        bases.append(_Base(env, sender, recipient, round_index, kind, ci))
    return variants, bases


def _rewrite_field(rng: random.Random, env: bytes) -> tuple[bytes, str, dict[str, Any]]:
    name, off, size = rng.choice(_FIELDS)
    buf = bytearray(env)
    claimed: dict[str, Any] = {}
    if name in ("round", "sender", "recipient", "body_length") and rng.random() < 0.7:
        (old,) = struct.unpack_from(">Q" if size == 8 else ">I", env, off)
        new = max(0, old + rng.choice([-2, -1, 1, 2, 3]))
        if name == "body_length" and rng.random() < 0.5:
            new = rng.randrange(0, 2**64)
        new %= 2 ** (8 * size)
        struct.pack_into(">Q" if size == 8 else ">I", buf, off, new)
        if name in ("round", "sender", "recipient"):
            claimed[name] = new
    elif name == "kind" and rng.random() < 0.7:
        new_kind = rng.choice(["model", "model-return", "ckks:ct", "x", "y"])
        buf[off : off + size] = new_kind.encode().ljust(size, b"\x00")
        claimed["kind"] = new_kind
    elif name == "version":
        buf[off] = rng.choice([0, 2, 255])
    elif name == "flags":
        buf[off] = rng.randrange(256)
    else:
        buf[off : off + size] = rng.randbytes(size)
    return bytes(buf), f"rewrite:{name}", claimed


def _mutate(rng: random.Random, base: _Base, bases: list[_Base]) -> tuple[bytes, str, dict[str, Any]]:
    env = base.envelope
    n = len(env)
    op = rng.choice(
        ["bitflip", "bitflip-header", "bytes", "truncate", "extend", "insert", "delete", "splice", "sigswap", "rewrite"]
    )
    buf = bytearray(env)
    if op == "bitflip":
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            pos = rng.randrange(n)
            buf[pos] ^= 1 << rng.randrange(8)
        return bytes(buf), op, {}
    if op == "bitflip-header":
        pos = rng.randrange(HEADER_BYTES)
        buf[pos] ^= 1 << rng.randrange(8)
        return bytes(buf), op, {}
    if op == "bytes":
        for _ in range(rng.randint(1, 8)):
            buf[rng.randrange(n)] = rng.randrange(256)
        return bytes(buf), op, {}
    if op == "truncate":
        return env[: rng.randrange(n)], op, {}
    if op == "extend":
        return env + rng.randbytes(rng.randint(1, 64)), op, {}
    if op == "insert":
        pos = rng.randrange(n + 1)
        return env[:pos] + rng.randbytes(rng.randint(1, 32)) + env[pos:], op, {}
    if op == "delete":
        pos = rng.randrange(n)
        return env[:pos] + env[pos + rng.randint(1, 32) :], op, {}
    if op == "splice":
        other = rng.choice(bases).envelope
        cut_a = rng.randrange(n + 1)
        cut_b = cut_a if rng.random() < 0.5 else rng.randrange(len(other) + 1)
        return env[:cut_a] + other[cut_b:], op, {}
    if op == "sigswap":
        other = rng.choice(bases).envelope
        return env[:-64] + other[-64:], op, {}
    return _rewrite_field(rng, env)


def run_envelope_fuzz(count: int = 10_000, *, seed: int = 0, num_peers: int = 4) -> FuzzReport:
    """Fuzz the receiver with ``count`` mutants; see the module docstring."""
    rng = random.Random(seed)
    keyring = generate_keys(num_peers, "fuzz-federation")
    channels, bases = _make_bases(rng, keyring)
    originals = {b.envelope for b in bases}
    report = FuzzReport(count=count, seed=seed)
    before = [c.replay_state() for c in channels]
    t0 = time.perf_counter()
    done = 0
    while done < count:
        base = rng.choice(bases)
        mutant, op, claimed = _mutate(rng, base, bases)
        if mutant in originals:
            report.skipped_identical += 1
            continue
        done += 1
        report.operations[op] += 1
        ctx = {"sender": base.sender, "recipient": base.recipient, "round_index": base.round_index, "kind": base.kind}
        if claimed and rng.random() < 0.7:
            # open with the context the rewritten header claims, so the
            # rewrite reaches the signature check instead of a context check
            for key, value in claimed.items():
                ctx["round_index" if key == "round" else key] = value
            if ctx["recipient"] not in keyring.identities:
                ctx["recipient"] = base.recipient
        channel = channels[rng.randrange(len(channels))] if rng.random() < 0.2 else channels[base.channel_index]
        try:
            channel.open(mutant, **ctx)
        except (CryptoError, CodecError) as exc:
            report.rejections[type(exc).__name__] += 1
            continue
        except Exception as exc:  # noqa: BLE001 - a finding, recorded
            report.crashes += 1
            report.examples.append(f"crash ({op}): {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}")
            continue
        report.accepted += 1
        report.examples.append(f"ACCEPTED ({op}): {mutant[:120].hex()}... ctx={ctx}")
    report.seconds = time.perf_counter() - t0
    report.state_unchanged = before == [c.replay_state() for c in channels]
    still = True
    for b in sorted(bases, key=lambda b: b.round_index):  # oldest first: newer rounds age older ones out
        try:
            channels[b.channel_index].open(
                b.envelope, sender=b.sender, recipient=b.recipient, round_index=b.round_index, kind=b.kind
            )
        except CryptoError as exc:
            still = False
            report.examples.append(f"original no longer opens: {type(exc).__name__}: {exc}")
    report.originals_still_open = still
    return report
