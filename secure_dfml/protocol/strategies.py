"""DFML and its baselines as strategies, split by role.

A strategy chooses each round's groups from public values and says what each
role does -- what a sender sends, what an aggregator does with what arrived,
what a sender does with what comes back.  Roles act only on messages that
arrived: a failure is a message that did not come, never an oracle.

* ``dfml``: senders (optionally) train locally and send to the round's
  aggregator, which (optionally) averages same-architecture models, runs mutual
  learning with WSM supervision and cyclic alpha on its data, and returns
  every model.
* ``local``: every peer trains on its own data only.
* ``gossip-avg``: decentralized FedAvg; each group averages at its aggregator.
* ``def-kt``: Def-KT style teacher -> student pairs: the student runs deep
  mutual learning (constant alpha 0.5, plain cross-entropy) on its data
  between its model and the teacher's, and returns the teacher's model.
* ``fedavg-central``: every peer trains, a server averages (reference upper
  bound; the server is a virtual node with no data).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from secure_dfml.config import RunConfig
from secure_dfml.protocol import _secure
from secure_dfml.protocol.node import PeerNode, Program, clone_state, weighted_average
from secure_dfml.protocol.selection import Group, select_groups

MODEL = "model"
RETURN = "return"

DataPhase = tuple[int, str, int]  # (peer whose data is read, "local" | "mutual", epochs)


@dataclass
class Entry:
    """One model in the aggregator's hands and the peers it goes back to."""

    model: nn.Module
    owners: list[int]
    averaged: bool = False


def hashed_groups(cfg: RunConfig, num_peers: int, round_index: int) -> tuple[Group, ...]:
    f = cfg.federation
    return select_groups(
        federation_id=f.id,
        seed=f.seed,
        round_index=round_index,
        num_peers=num_peers,
        participants=f.participants,
        groups=f.groups,
    )


class Strategy:
    """An algorithm on the one peer implementation: how a round's groups are
    chosen and what each role does.  Strategies never loop over rounds."""

    name: str = "strategy"
    needs_homogeneous: bool = False
    uses_server: bool = False
    averages: bool = False  # averages same-architecture models (so CKKS may protect the sums)

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg

    def select(self, num_peers: int, round_index: int) -> Sequence[Group]:
        """The round's groups, from public values only."""
        raise NotImplementedError

    def data_phases(self, group: Group) -> Sequence[DataPhase]:
        """(peer, "local" | "mutual", epochs) for each phase of ``group`` that reads
        a peer's private data -- what a privacy planner calibrates noise to."""
        raise NotImplementedError

    def aggregate(self, node: PeerNode, group: Group) -> Program:
        raise NotImplementedError

    def send(self, node: PeerNode, group: Group) -> Program:
        raise NotImplementedError

    def programs(self, node: PeerNode, round_index: int) -> Iterator[Program]:
        """The node's role programs this round: aggregator or sender of its group,
        and CKKS key holder for any group that picked it."""
        for group in self.select(node.directory.num_peers, round_index):
            if node.peer_id == group.aggregator:
                yield self.aggregate(node, group)
            elif node.peer_id in group.senders:
                yield self.send(node, group)
            if self.averages:
                yield from _secure.key_holder_programs(node, group)


StrategyFactory = Callable[[RunConfig], Strategy]


# -- shared role steps --------------------------------------------------------------


def contribute(node: PeerNode, group: Group, *, average: bool) -> Program:
    """Sender: bring this node's model to the aggregator -- as a CKKS
    ciphertext when the group's architecture sum is protected, else sealed."""
    if average and (yield from _secure.contribute(node, group)):
        return
    node.send_state(group.aggregator, MODEL, clone_state(node.model))


def collect(node: PeerNode, group: Group, *, average: bool) -> Iterator[Any]:
    """Aggregator: the group's models that arrived -- CKKS sums per protected
    architecture, individual envelopes for the rest (averaged per architecture
    when ``average``) -- as entries, plus what arrived for the metrics."""
    a = group.aggregator
    d = node.directory
    own_arch = None if a == d.server_id else d.archs[a]
    by_arch: dict[str, list[int]] = defaultdict(list)
    for s in group.senders:
        by_arch[d.archs[s]].append(s)

    entries: list[Entry] = []
    own_consumed = False
    individual: list[int] = []
    info: dict[str, Any] = {"secure_sums": []}
    for arch, senders in by_arch.items():
        include_own = own_arch == arch
        result = (yield from _secure.aggregate(node, group, senders, include_own)) if average else None
        if result is None:
            individual.extend(senders)
            continue
        avg, arrived, late = result
        individual.extend(late)  # contributors that fell back to individual exchange
        if avg is None:
            continue
        model = node.fresh_model(arrived[0])
        model.load_state_dict(avg)
        entries.append(Entry(model, [*arrived, *([a] if include_own else [])], averaged=True))
        own_consumed |= include_own
        info["secure_sums"].append({"arch": arch, "contributors": arrived})

    individual = [s for s in group.senders if s in set(individual)]
    received = yield from node.receive_states(MODEL, individual, node.cfg.dfml.sender_timeout, lambda s: d.schemas[s])
    for s, state in received.items():
        node.note_view("received", s, state)
    info["received"] = sorted(received)
    info["missing"] = [s for s in individual if s not in received]

    if average:
        received_by_arch: dict[str, list[int]] = defaultdict(list)
        for s in received:
            received_by_arch[d.archs[s]].append(s)
        for arch, senders in received_by_arch.items():
            include_own = own_arch == arch and not own_consumed
            if len(senders) + int(include_own) == 1:
                continue  # a single model: nothing to average
            states = [received[s] for s in senders]
            weights = [float(d.num_train[s]) for s in senders]
            if include_own:
                states.append(clone_state(node.model))
                weights.append(float(d.num_train[a]))
            model = node.fresh_model(senders[0])
            model.load_state_dict(weighted_average(states, weights))
            entries.append(Entry(model, [*senders, *([a] if include_own else [])], averaged=True))
            own_consumed |= include_own
            for s in senders:
                del received[s]
    for s, state in received.items():
        model = node.fresh_model(s)
        model.load_state_dict(state)
        entries.append(Entry(model, [s]))
    if a != d.server_id and not own_consumed:
        entries.insert(0, Entry(node.model, [a]))
    return entries, info


def give_back(node: PeerNode, entries: Sequence[Entry]) -> None:
    """Aggregator: return each model to its owners (adopting its own)."""
    for entry in entries:
        state = clone_state(entry.model)
        for owner in entry.owners:
            if owner == node.peer_id:
                if entry.model is not node.model:
                    node.adopt(state)
            else:
                node.send_state(owner, RETURN, state)


def take_back(node: PeerNode, group: Group) -> Program:
    """Sender: adopt the model the aggregator returns, if it comes in time;
    otherwise keep the pre-round model."""
    a = group.aggregator
    own_schema = node.directory.schemas[node.peer_id]
    got = yield from node.receive_states(RETURN, [a], node.cfg.dfml.return_timeout, lambda _s: own_schema)
    if a in got:
        node.adopt(got[a], from_peer=a)
        node.note_view("returned", node.peer_id, got[a])


# -- the strategies ---------------------------------------------------------------------


class DFMLStrategy(Strategy):
    name = "dfml"

    def __init__(self, cfg: RunConfig, *, fixed_alpha: float | None = None, use_wsm: bool = True) -> None:
        super().__init__(cfg)
        self.dfml = cfg.dfml
        self.fixed_alpha = fixed_alpha
        self.use_wsm = use_wsm
        self.average = cfg.dfml.average_same_arch
        self.averages = self.average
        self.sender_epochs = cfg.dfml.local_epochs

    def select(self, num_peers: int, round_index: int) -> Sequence[Group]:
        return hashed_groups(self.cfg, num_peers, round_index)

    def data_phases(self, group: Group) -> list[DataPhase]:
        return [*((s, "local", self.sender_epochs) for s in group.senders), (group.aggregator, "mutual", self.dfml.ml_epochs)]

    def send(self, node: PeerNode, group: Group) -> Program:
        node.local_train(self.sender_epochs)
        yield from contribute(node, group, average=self.average)
        yield from take_back(node, group)

    def aggregate(self, node: PeerNode, group: Group) -> Program:
        entries, info = yield from collect(node, group, average=self.average)
        alpha = node.log.alpha if self.fixed_alpha is None else self.fixed_alpha
        prior = node.trainer.class_prior(node.state, round_index=node.round_index) if self.use_wsm else None
        report = node.trainer.mutual_train(
            node.state,
            [e.model for e in entries],
            alpha=alpha if len(entries) > 1 else 0.0,
            temperature=self.dfml.temperature,
            epochs=self.dfml.ml_epochs,
            class_prior=prior,
            round_index=node.round_index,
        )
        node.record_phase("mutual", report)
        info["models_in_mutual_learning"] = len(entries)
        give_back(node, entries)
        node.report_group(group, info)


class DefKTStrategy(DFMLStrategy):
    name = "def-kt"

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg, fixed_alpha=0.5, use_wsm=False)
        self.average = self.averages = False
        self.sender_epochs = max(1, cfg.dfml.local_epochs)  # Def-KT teachers always train locally

    def select(self, num_peers: int, round_index: int) -> Sequence[Group]:
        """The round's participants, paired student <- teacher."""
        members = [m for g in hashed_groups(self.cfg, num_peers, round_index) for m in g.members]
        return tuple(Group(aggregator=members[i], senders=(members[i + 1],)) for i in range(0, len(members) - 1, 2))


class LocalStrategy(Strategy):
    name = "local"

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.epochs = max(1, cfg.dfml.local_epochs)

    def select(self, num_peers: int, round_index: int) -> Sequence[Group]:
        return tuple(Group(aggregator=p, senders=()) for p in range(num_peers))

    def data_phases(self, group: Group) -> list[DataPhase]:
        return [(group.aggregator, "local", self.epochs)]

    def aggregate(self, node: PeerNode, group: Group) -> Program:
        node.local_train(self.epochs)
        node.report_group(group, {})
        yield from ()  # a program that never waits for a message


class GossipAvgStrategy(Strategy):
    name = "gossip-avg"
    needs_homogeneous = True
    averages = True

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.epochs = max(1, cfg.dfml.local_epochs)

    def select(self, num_peers: int, round_index: int) -> Sequence[Group]:
        return hashed_groups(self.cfg, num_peers, round_index)

    def data_phases(self, group: Group) -> list[DataPhase]:
        return [(p, "local", self.epochs) for p in group.members]

    def send(self, node: PeerNode, group: Group) -> Program:
        node.local_train(self.epochs)
        yield from contribute(node, group, average=True)
        yield from take_back(node, group)

    def aggregate(self, node: PeerNode, group: Group) -> Program:
        node.local_train(self.epochs)
        entries, info = yield from collect(node, group, average=True)
        give_back(node, entries)
        node.report_group(group, info)


class CentralFedAvgStrategy(GossipAvgStrategy):
    name = "fedavg-central"
    uses_server = True

    def select(self, num_peers: int, round_index: int) -> Sequence[Group]:
        # the server is a virtual node with id num_peers (PublicDirectory.server_id) and no data
        return (Group(aggregator=num_peers, senders=tuple(range(num_peers))),)

    def data_phases(self, group: Group) -> list[DataPhase]:
        return [(p, "local", self.epochs) for p in group.senders]

    def aggregate(self, node: PeerNode, group: Group) -> Program:
        entries, info = yield from collect(node, group, average=True)
        for entry in entries:  # one architecture: one averaged entry
            node.adopt(clone_state(entry.model))
        give_back(node, entries)
        node.report_group(group, info)


STRATEGIES: dict[str, StrategyFactory] = {
    "dfml": DFMLStrategy,
    "def-kt": DefKTStrategy,
    "local": LocalStrategy,
    "gossip-avg": GossipAvgStrategy,
    "fedavg-central": CentralFedAvgStrategy,
}


def build_strategy(cfg: RunConfig) -> Strategy:
    return STRATEGIES[cfg.federation.algorithm](cfg)


def public_schedule(cfg: RunConfig, num_peers: int) -> list[list[DataPhase]]:
    """Per round, every phase that will read a peer's private data.

    Derived from public values only (the configuration, the federation id and
    seed, the number of peers) -- never from data -- so a privacy planner may
    calibrate noise to it without leaking anything.  Simulated link failures do
    not change it: a group whose models do not arrive still runs its phases."""
    strategy = build_strategy(cfg)
    return [
        [ph for g in strategy.select(num_peers, t) for ph in strategy.data_phases(g) if ph[2] > 0]
        for t in range(cfg.federation.rounds)
    ]
