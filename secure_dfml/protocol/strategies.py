"""DFML and its baselines as strategies on the one round engine.

* ``dfml``: senders train locally and send to the round's aggregator, which
  (optionally) averages same-architecture models, runs mutual learning with
  WSM supervision and cyclic alpha on its data, and returns every model.
* ``local``: every peer trains on its own data only.
* ``gossip-avg``: decentralized FedAvg; each group averages at its aggregator.
* ``def-kt``: Def-KT style teacher -> student pairs: the student runs deep
  mutual learning (constant alpha 0.5, plain cross-entropy) on its data
  between its model and the teacher's, and returns the teacher's model.
* ``fedavg-central``: every peer trains, a server averages (reference upper
  bound; the server is a virtual endpoint with no data).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from secure_dfml.config import RunConfig
from secure_dfml.protocol.engine import DataPhase, RoundEngine, Strategy, StrategyFactory, clone_state
from secure_dfml.protocol.selection import Group, select_groups

MODEL = "model"
RETURN = "return"
SECURE = "ckks"


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


def collect(engine: RoundEngine, group: Group, *, average: bool) -> tuple[list[Entry], dict[str, Any]]:
    """Bring the senders' models to the aggregator: under secure averaging as
    one CKKS sum per architecture, otherwise as individual envelopes (averaged
    per architecture by the aggregator when ``average``)."""
    a = group.aggregator
    own_arch = engine.peers[a].arch if a < engine.server_id else None
    by_arch: dict[str, list[int]] = defaultdict(list)
    for s in group.senders:
        by_arch[engine.peers[s].arch].append(s)

    entries: list[Entry] = []
    own_consumed = False
    individual: list[int] = []
    info: dict[str, Any] = {"secure_sums": []}
    for arch, senders in by_arch.items():
        include_own = a < engine.server_id and own_arch == arch
        result = engine.secure_average(a, senders, include_own, SECURE) if average else None
        if result is None:
            individual.extend(senders)
            continue
        avg, arrived = result
        model = engine.fresh_model(arrived[0])
        model.load_state_dict(avg)
        entries.append(Entry(model, [*arrived, *([a] if include_own else [])], averaged=True))
        own_consumed |= include_own
        info["secure_sums"].append({"arch": arch, "contributors": arrived})

    for s in individual:
        engine.send_model(s, a, MODEL, clone_state(engine.peers[s].model))
    received = engine.receive_models(a, MODEL, individual)
    info["received"] = sorted(received)
    info["missing"] = [s for s in individual if s not in received]

    if average:
        received_by_arch: dict[str, list[int]] = defaultdict(list)
        for s in received:
            received_by_arch[engine.peers[s].arch].append(s)
        for arch, senders in received_by_arch.items():
            include_own = a < engine.server_id and own_arch == arch and not own_consumed
            if len(senders) + int(include_own) == 1:
                continue  # a single model: nothing to average
            avg = engine.average_group(a, {s: received[s] for s in senders}, own=include_own)
            model = engine.fresh_model(senders[0])
            model.load_state_dict(avg)
            entries.append(Entry(model, [*senders, *([a] if include_own else [])], averaged=True))
            own_consumed |= include_own
            for s in senders:
                del received[s]
    for s, state in received.items():
        model = engine.fresh_model(s)
        model.load_state_dict(state)
        entries.append(Entry(model, [s]))
    if a < engine.server_id and not own_consumed:
        entries.insert(0, Entry(engine.peers[a].model, [a]))
    return entries, info


def give_back(engine: RoundEngine, group: Group, entries: Sequence[Entry]) -> list[int]:
    """The aggregator returns each model to its owners; senders adopt what arrives."""
    a = group.aggregator
    expecting: list[int] = []
    for entry in entries:
        state = clone_state(entry.model)
        for owner in entry.owners:
            if owner == a:
                if entry.model is not engine.model_of(a):
                    engine.adopt(a, state)
            else:
                engine.send_model(a, owner, RETURN, state)
                expecting.append(owner)
    adopted = []
    for s in expecting:
        got = engine.receive_models(s, RETURN, [a], schema_from={a: s})
        if a in got:
            engine.adopt(s, got[a])
            adopted.append(s)
    return adopted


class DFMLStrategy(Strategy):
    name = "dfml"

    def __init__(self, cfg: RunConfig, *, fixed_alpha: float | None = None, use_wsm: bool = True) -> None:
        self.cfg = cfg
        self.dfml = cfg.dfml
        self.fixed_alpha = fixed_alpha
        self.use_wsm = use_wsm
        self.average = cfg.dfml.average_same_arch
        self.sender_epochs = cfg.dfml.local_epochs

    def select(self, num_peers: int, round_index: int) -> Sequence[Group]:
        return hashed_groups(self.cfg, num_peers, round_index)

    def data_phases(self, group: Group) -> list[DataPhase]:
        return [*((s, "local", self.sender_epochs) for s in group.senders), (group.aggregator, "mutual", self.dfml.ml_epochs)]

    def run_group(self, engine: RoundEngine, group: Group) -> dict[str, Any]:
        for s in group.senders:
            engine.local_train(s, self.sender_epochs)
        entries, info = collect(engine, group, average=self.average)
        aggregator = engine.peers[group.aggregator]
        alpha = engine.stats.alpha if self.fixed_alpha is None else self.fixed_alpha
        prior = (
            engine.trainer.class_prior(aggregator, round_index=engine.stats.round_index) if self.use_wsm else None
        )
        if len(entries) >= 1:
            report = engine.trainer.mutual_train(
                aggregator,
                [e.model for e in entries],
                alpha=alpha if len(entries) > 1 else 0.0,
                temperature=self.dfml.temperature,
                epochs=self.dfml.ml_epochs,
                class_prior=prior,
                round_index=engine.stats.round_index,
            )
            engine.record_phase(group.aggregator, "mutual", report)
        info["models_in_mutual_learning"] = len(entries)
        info["returned"] = give_back(engine, group, entries)
        return info


class DefKTStrategy(DFMLStrategy):
    name = "def-kt"

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg, fixed_alpha=0.5, use_wsm=False)
        self.average = False
        self.sender_epochs = max(1, cfg.dfml.local_epochs)  # Def-KT teachers always train locally

    def select(self, num_peers: int, round_index: int) -> Sequence[Group]:
        """The round's participants, paired student <- teacher."""
        members = [m for g in hashed_groups(self.cfg, num_peers, round_index) for m in g.members]
        return tuple(Group(aggregator=members[i], senders=(members[i + 1],)) for i in range(0, len(members) - 1, 2))


class LocalStrategy(Strategy):
    name = "local"

    def __init__(self, cfg: RunConfig) -> None:
        self.epochs = max(1, cfg.dfml.local_epochs)

    def select(self, num_peers: int, round_index: int) -> Sequence[Group]:
        return tuple(Group(aggregator=p, senders=()) for p in range(num_peers))

    def data_phases(self, group: Group) -> list[DataPhase]:
        return [(group.aggregator, "local", self.epochs)]

    def run_group(self, engine: RoundEngine, group: Group) -> dict[str, Any]:
        engine.local_train(group.aggregator, self.epochs)
        return {}


class GossipAvgStrategy(Strategy):
    name = "gossip-avg"
    needs_homogeneous = True

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.epochs = max(1, cfg.dfml.local_epochs)

    def select(self, num_peers: int, round_index: int) -> Sequence[Group]:
        return hashed_groups(self.cfg, num_peers, round_index)

    def data_phases(self, group: Group) -> list[DataPhase]:
        return [(p, "local", self.epochs) for p in group.members]

    def run_group(self, engine: RoundEngine, group: Group) -> dict[str, Any]:
        for p in group.members:
            engine.local_train(p, self.epochs)
        entries, info = collect(engine, group, average=True)
        info["returned"] = give_back(engine, group, entries)
        return info


class CentralFedAvgStrategy(GossipAvgStrategy):
    name = "fedavg-central"
    uses_server = True

    def select(self, num_peers: int, round_index: int) -> Sequence[Group]:
        # the server is a virtual endpoint with id num_peers (= RoundEngine.server_id) and no data
        return (Group(aggregator=num_peers, senders=tuple(range(num_peers))),)

    def data_phases(self, group: Group) -> list[DataPhase]:
        return [(p, "local", self.epochs) for p in group.senders]

    def run_group(self, engine: RoundEngine, group: Group) -> dict[str, Any]:
        for p in group.senders:
            engine.local_train(p, self.epochs)
        entries, info = collect(engine, group, average=True)
        for entry in entries:  # one architecture: one averaged entry
            engine.adopt(engine.server_id, clone_state(entry.model))
        info["returned"] = give_back(engine, group, entries)
        return info


STRATEGIES: dict[str, StrategyFactory] = {
    "dfml": DFMLStrategy,
    "def-kt": DefKTStrategy,
    "local": LocalStrategy,
    "gossip-avg": GossipAvgStrategy,
    "fedavg-central": CentralFedAvgStrategy,
}


def build_strategy(cfg: RunConfig) -> Strategy:
    return STRATEGIES[cfg.federation.algorithm](cfg)
