"""CKKS secure averaging as protocol messages among roles.

For each group and each architecture with at least two senders (decided from
public values), a key holder chosen from public values -- never the
aggregator or one of the group's senders -- runs the protocol with real
messages, each in an envelope through the transport:

1. key holder -> every contributor and the aggregator: a fresh public CKKS
   context (``ckks-ctx-<i>``; no secret, Galois or relinearisation keys);
2. contributor -> aggregator: its own model, validated, scaled by its share
   ``w_s / W`` of the architecture's declared sample counts and encrypted
   (``ckks-ct-<i>``);
3. aggregator -> key holder: the sum of the ciphertexts that arrived
   (``ckks-sum-<i>``), only if at least two did (a sum of one would reveal it);
4. key holder -> aggregator: the decrypted sum, rounded to the release grid
   (``ckks-avg-<i>``); the aggregator rescales it to the average of the
   contributors that arrived and adds its own model in the clear.

Faults fall back after a timeout: a contributor that gets no context sends its
model individually (as without CKKS); a sum that cannot be completed (fewer
than two ciphertexts, no decrypted sum in time) is dropped, and its
contributors keep their pre-round models (their ciphertexts cannot be
decrypted one by one, by design).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from secure_dfml.errors import CodecError
from secure_dfml.protocol.selection import Group, select_key_holder

if TYPE_CHECKING:
    from secure_dfml.protocol.node import PeerNode, Program

MIN_CONTRIBUTORS = 2


def protected_archs(node: PeerNode, group: Group) -> list[tuple[int, str, list[int], int]]:
    """(index, arch, contributors, key holder) of each architecture of ``group``
    whose sum is protected -- the same answer at every peer (public values only)."""
    if node.averager is None:
        return []
    d = node.directory
    by_arch: dict[str, list[int]] = defaultdict(list)
    for s in group.senders:
        by_arch[d.archs[s]].append(s)
    key_holder = select_key_holder(
        federation_id=d.federation_id,
        seed=node.cfg.federation.seed,
        round_index=node.round_index,
        num_peers=d.num_peers,
        exclude={group.aggregator, *group.senders},
    )
    if key_holder is None:
        return []
    return [
        (i, arch, senders, key_holder)
        for i, (arch, senders) in enumerate(by_arch.items())
        if len(senders) >= MIN_CONTRIBUTORS
    ]


def _names(node: PeerNode, peer: int) -> list[str]:
    return list(node.directory.schemas[peer])


def _numel(node: PeerNode, peer: int) -> int:
    return sum(math.prod(spec.shape) for spec in node.directory.schemas[peer].values())


def _decode_vector(payload: bytes, numel: int) -> np.ndarray:
    if len(payload) != 8 * numel:
        raise CodecError(f"released average has {len(payload)} bytes, expected {8 * numel} ({numel} float64 values)")
    values = np.frombuffer(payload, dtype="<f8").copy()
    if not np.isfinite(values).all():
        raise CodecError("released average has NaN or Inf values")
    return values


def contribute(node: PeerNode, group: Group) -> Iterator[Any]:
    """Contributor: encrypt this node's model for the aggregator if its
    architecture's sum is protected.  Returns False when the model must travel
    individually (not protected, or no context arrived in time)."""
    mine = [(i, senders, k) for i, arch, senders, k in protected_archs(node, group) if node.peer_id in senders]
    if not mine:
        return False
    i, senders, key_holder = mine[0]
    roles = node.averager
    ctx = yield from node.receive(
        f"ckks-ctx-{i}", [key_holder], node.cfg.dfml.sender_timeout, lambda s, payload: roles.load_context(payload, node.peer_id)
    )
    if key_holder not in ctx:
        return False
    d = node.directory
    share = d.num_train[node.peer_id] / sum(d.num_train[s] for s in senders)
    state = {k: v.detach() for k, v in node.model.state_dict().items()}
    payload = node.timed_crypto(lambda: roles.encrypt(ctx[key_holder], state, _names(node, node.peer_id), share, node.peer_id))
    node.send_payload(group.aggregator, f"ckks-ct-{i}", payload)
    return True


def aggregate(node: PeerNode, group: Group, senders: Sequence[int], include_own: bool) -> Iterator[Any]:
    """Aggregator: the CKKS-protected average of ``senders`` (one architecture).

    Returns None when this architecture is not protected; otherwise
    (average state or None, contributors in it, contributors to expect
    individually)."""
    match = [(i, k) for i, _arch, c, k in protected_archs(node, group) if list(c) == list(senders)]
    if not match:
        return None
    i, key_holder = match[0]
    roles = node.averager
    timeout = node.cfg.dfml.sender_timeout
    ctx = yield from node.receive(f"ckks-ctx-{i}", [key_holder], timeout, lambda s, p: roles.load_context(p, node.peer_id))
    if key_holder not in ctx:
        return None, [], list(senders)  # no key holder: everyone falls back to individual exchange
    numel = _numel(node, senders[0])
    cts = yield from node.receive(
        f"ckks-ct-{i}", senders, timeout, lambda s, p: roles.check_ciphertexts(ctx[key_holder], p, numel, s)
    )
    late = [s for s in senders if s not in cts]
    arrived = [s for s in senders if s in cts]
    if len(arrived) < MIN_CONTRIBUTORS:
        return None, [], late
    summed = node.timed_crypto(lambda: roles.add(ctx[key_holder], cts, numel))
    node.send_payload(key_holder, f"ckks-sum-{i}", summed)
    got = yield from node.receive(
        f"ckks-avg-{i}", [key_holder], node.cfg.dfml.return_timeout, lambda s, p: _decode_vector(p, numel)
    )
    if key_holder not in got:
        return None, [], late
    d = node.directory
    planned = float(sum(d.num_train[s] for s in senders))
    weight = float(sum(d.num_train[s] for s in arrived))
    flat = torch.from_numpy(got[key_holder] * planned)  # = sum over arrived of w_s * model_s
    own = node.model.state_dict()
    template = own if include_own else node.fresh_model(senders[0]).state_dict()
    if include_own:
        weight += float(d.num_train[node.peer_id])
    avg: dict[str, torch.Tensor] = {}
    offset = 0
    for name, spec in d.schemas[senders[0]].items():
        n = math.prod(spec.shape)
        part = flat[offset : offset + n].reshape(tuple(spec.shape))
        if include_own:
            part = part + float(d.num_train[node.peer_id]) * own[name].double()
        template = own[name] if include_own else node.fresh_model(senders[0]).state_dict()[name]
        avg[name] = (part / weight).to(template.dtype)
        offset += n
    return avg, arrived, late


def key_holder_programs(node: PeerNode, group: Group) -> Iterator[Program]:
    """The key holder's program for each protected architecture of ``group`` it holds."""
    for i, _arch, senders, key_holder in protected_archs(node, group):
        if key_holder == node.peer_id:
            yield _hold_key(node, group, i, senders)


def _hold_key(node: PeerNode, group: Group, i: int, senders: Sequence[int]) -> Program:
    roles = node.averager
    secret, public = node.timed_crypto(roles.new_context)
    for peer in (*senders, group.aggregator):
        node.send_payload(peer, f"ckks-ctx-{i}", public)
    numel = _numel(node, senders[0])
    got = yield from node.receive(
        f"ckks-sum-{i}", [group.aggregator], node.cfg.dfml.return_timeout,
        lambda s, p: roles.decrypt_sum(secret, p, numel, s),
    )
    if group.aggregator in got:
        node.send_payload(group.aggregator, f"ckks-avg-{i}", np.asarray(got[group.aggregator], dtype="<f8").tobytes())


__all__ = ["MIN_CONTRIBUTORS", "aggregate", "contribute", "key_holder_programs", "protected_archs"]
