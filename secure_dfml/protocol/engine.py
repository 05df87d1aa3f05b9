"""The one round engine.  DFML and every baseline run on it; privacy (Trainer),
encryption (Channel) and secure averaging (SecureAverager) plug into it."""

from __future__ import annotations

import copy
import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from secure_dfml.config import RunConfig
from secure_dfml.crypto.codec import Schema, decode_state, encode_state, schema_of
from secure_dfml.errors import SecureDFMLError
from secure_dfml.protocol._interfaces import Channel, PeerState, PhaseReport, SecureAverager, Trainer
from secure_dfml.protocol.schedule import alpha_at, is_peak
from secure_dfml.protocol.selection import Group, select_key_holder
from secure_dfml.transport import Message, Transport

logger = logging.getLogger(__name__)


@dataclass
class RoundStats:
    """Counters of one round, filled by the engine and the strategy."""

    round_index: int
    alpha: float
    peak: bool
    groups: list[dict[str, Any]] = field(default_factory=list)
    compute_seconds: float = 0.0
    crypto_seconds: float = 0.0
    codec_seconds: float = 0.0
    extra_bytes: int = 0
    phases: list[dict[str, Any]] = field(default_factory=list)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2048) -> float:
    """Accuracy of ``model`` on (x, y); NaN for an empty set."""
    if len(y) == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(y), batch_size):
        correct += int((model(x[start : start + batch_size]).argmax(1) == y[start : start + batch_size]).sum())
    model.train(was_training)
    return correct / len(y)


def clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def weighted_average(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Sample-count weighted average of same-architecture states."""
    total = float(sum(weights))
    return {
        k: sum((s[k].double() * (w / total) for s, w in zip(states, weights)), torch.zeros(())).to(states[0][k].dtype)
        for k in states[0]
    }


def link_fails(cfg: RunConfig, round_index: int, sender: int, recipient: int, kind: str) -> bool:
    """Simulated link failure (``dfml.drop_probability``), deterministic in
    (seed, round, sender, recipient, kind)."""
    p = cfg.dfml.drop_probability
    if p <= 0:
        return False
    key = f"{cfg.federation.seed}|{round_index}|{sender}|{recipient}|{kind}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") / 2**64 < p


class RoundEngine:
    """Runs rounds: selection -> strategy group step -> peak snapshots -> evaluation.

    Peers talk only through ``transport``; every model that moves is encoded
    with the safe codec and sealed by ``channel`` exactly as it would travel.
    """

    def __init__(
        self,
        *,
        cfg: RunConfig,
        peers: Sequence[PeerState],
        x_test: torch.Tensor,
        y_test: torch.Tensor,
        strategy: Strategy,
        trainer: Trainer,
        channel: Channel,
        transport: Transport,
        model_factory: Callable[[int], nn.Module],
        averager: SecureAverager | None = None,
        server_model: nn.Module | None = None,
    ) -> None:
        self.cfg = cfg
        self.peers = list(peers)
        self.x_test = x_test
        self.y_test = y_test
        self.strategy = strategy
        self.trainer = trainer
        self.channel = channel
        self.transport = transport
        self.averager = averager
        self.model_factory = model_factory
        self.server_id = len(self.peers)
        self.server_model = server_model
        # Architectures are public (the peer directory); schemas come from them.
        self._schemas: dict[int, Schema] = {p.peer_id: schema_of(p.model.state_dict()) for p in self.peers}
        if server_model is not None:
            self._schemas[self.server_id] = schema_of(server_model.state_dict())
        self._stats: RoundStats | None = None
        self.rejected_messages = 0
        # What a curious peer saw: the latest model of each sender as received by an
        # aggregator ("received", sender) and returned to each sender ("returned", sender).
        self.views: dict[tuple[str, int], dict[str, torch.Tensor]] = {}

    # -- helpers used by strategies -------------------------------------------------

    @property
    def stats(self) -> RoundStats:
        assert self._stats is not None, "only valid inside a round"
        return self._stats

    def fresh_model(self, peer_id: int) -> nn.Module:
        """A new instance of ``peer_id``'s (public) architecture, to load received weights into."""
        return self.model_factory(peer_id)

    def model_of(self, peer_id: int) -> nn.Module:
        if peer_id == self.server_id and self.server_model is not None:
            return self.server_model
        return self.peers[peer_id].model

    def record_phase(self, peer_id: int, phase: str, report: PhaseReport) -> PhaseReport:
        self.stats.compute_seconds += report.compute_seconds
        entry: dict[str, Any] = {"peer": peer_id, "phase": phase, "ran": report.ran, "steps": report.steps}
        if report.reason:
            entry["reason"] = report.reason
        if report.extra:
            entry.update(report.extra)
        self.stats.phases.append(entry)
        if not report.ran and report.reason:
            logger.info("round %d: peer %d %s phase skipped: %s", self.stats.round_index, peer_id, phase, report.reason)
        return report

    def local_train(self, peer_id: int, epochs: int) -> PhaseReport:
        report = self.trainer.local_train(self.peers[peer_id], epochs=epochs, round_index=self.stats.round_index)
        return self.record_phase(peer_id, "local", report)

    def send_model(self, sender: int, recipient: int, kind: str, state: Mapping[str, torch.Tensor]) -> None:
        t0 = time.perf_counter()
        payload = encode_state(state)
        t1 = time.perf_counter()
        envelope = self.channel.seal(
            payload, sender=sender, recipient=recipient, round_index=self.stats.round_index, kind=kind
        )
        t2 = time.perf_counter()
        self.stats.codec_seconds += t1 - t0
        self.stats.crypto_seconds += t2 - t1
        self.transport.send(Message(sender, recipient, self.stats.round_index, kind, envelope))

    def receive_models(
        self, recipient: int, kind: str, expected: Sequence[int], schema_from: Mapping[int, int] | None = None
    ) -> dict[int, dict[str, torch.Tensor]]:
        """Models for ``recipient`` from the ``expected`` senders that arrive before
        the timeout.  Anything unauthenticated or malformed is rejected and logged;
        it changes no state.  ``schema_from`` maps a sender to the peer whose
        architecture its payload must match (default: the sender's own)."""
        messages = self.transport.receive(
            recipient,
            round_index=self.stats.round_index,
            kind=kind,
            expected=len(expected),
            timeout=self.cfg.dfml.sender_timeout,
        )
        out: dict[int, dict[str, torch.Tensor]] = {}
        for m in messages:
            if m.sender not in expected or m.sender in out:
                self.rejected_messages += 1
                logger.warning("round %d: unexpected %s message from %d to %d dropped", m.round_index, kind, m.sender, recipient)
                continue
            try:
                t0 = time.perf_counter()
                schema = self._schemas[(schema_from or {}).get(m.sender, m.sender)]
                out[m.sender] = self.channel.open_with(
                    m.data,
                    lambda payload, schema=schema: decode_state(payload, schema),
                    sender=m.sender,
                    recipient=recipient,
                    round_index=self.stats.round_index,
                    kind=kind,
                )
                self.stats.crypto_seconds += time.perf_counter() - t0
                view = ("returned", recipient) if kind == "return" else ("received", m.sender)
                self.views[view] = out[m.sender]
            except SecureDFMLError as exc:
                self.rejected_messages += 1
                logger.warning("round %d: rejected %s message from %d: %s", m.round_index, kind, m.sender, exc)
        missing = [s for s in expected if s not in out]
        if missing:
            logger.info("round %d: %s from %s did not arrive in time; continuing without", self.stats.round_index, kind, missing)
        return out

    def adopt(self, peer_id: int, state: Mapping[str, torch.Tensor]) -> None:
        self.model_of(peer_id).load_state_dict(state)

    def average_group(
        self, aggregator: int, contributions: Mapping[int, Mapping[str, torch.Tensor]], own: bool
    ) -> dict[str, torch.Tensor]:
        """Weighted average of plain received states (+ the aggregator's own model if ``own``)."""
        states = list(contributions.values())
        weights = [float(self.peers[s].num_train) for s in contributions]
        if own:
            states.append(clone_state(self.peers[aggregator].model))
            weights.append(float(self.peers[aggregator].num_train))
        return weighted_average(states, weights)

    def secure_average(
        self, aggregator: int, senders: Sequence[int], include_own: bool, kind: str
    ) -> tuple[dict[str, torch.Tensor], list[int]] | None:
        """Average the senders' models with the SecureAverager so the aggregator
        never sees an individual one.  Returns (average, contributors that made
        it) or None when secure averaging is off or cannot protect this group
        (too few contributors, no key holder): the caller falls back to
        individual exchange."""
        if self.averager is None:
            return None
        arrived = [s for s in senders if self.link_up(s, aggregator, kind)]
        if len(arrived) < self.averager.min_contributors():
            logger.info(
                "round %d: only %d contributor(s) for secure averaging at aggregator %d (need %d); "
                "falling back to individual exchange",
                self.stats.round_index, len(arrived), aggregator, self.averager.min_contributors(),
            )
            return None
        key_holder = select_key_holder(
            federation_id=self.cfg.federation.id,
            seed=self.cfg.federation.seed,
            round_index=self.stats.round_index,
            num_peers=len(self.peers),
            exclude={aggregator, *arrived},
        )
        if key_holder is None:
            logger.info("round %d: no peer outside the group can hold the CKKS key; individual exchange", self.stats.round_index)
            return None
        contributions = [(s, clone_state(self.peers[s].model), float(self.peers[s].num_train)) for s in arrived]
        result = self.averager.weighted_sum(
            contributions, aggregator=aggregator, key_holder=key_holder, round_index=self.stats.round_index
        )
        self.stats.crypto_seconds += result.crypto_seconds
        self.stats.extra_bytes += result.bytes_moved
        state_sum, weight_sum = result.state_sum, result.weight_sum
        if include_own:
            w = float(self.peers[aggregator].num_train)
            own = self.peers[aggregator].model.state_dict()
            state_sum = {k: state_sum[k].double() + w * own[k].double() for k in state_sum}
            weight_sum += w
        template = self.peers[arrived[0]].model.state_dict()  # same architecture as every contributor
        avg = {k: (state_sum[k].double() / weight_sum).to(template[k].dtype) for k in template}
        return avg, arrived

    def link_up(self, sender: int, recipient: int, kind: str) -> bool:
        return not link_fails(self.cfg, self.stats.round_index, sender, recipient, kind)

    # -- the loop ----------------------------------------------------------------------

    def rounds(self) -> Iterator[dict[str, Any]]:
        """Run every round, yielding its metrics record."""
        cfg = self.cfg
        for t in range(cfg.federation.rounds):
            self._stats = RoundStats(t, alpha_at(t, cfg.dfml), is_peak(t, cfg.dfml))
            bytes_before = self.transport.bytes_sent
            t0 = time.perf_counter()
            for group in self.strategy.select(len(self.peers), t):
                info = self.strategy.run_group(self, group)
                self.stats.groups.append({"aggregator": group.aggregator, "senders": list(group.senders), **info})
            train_seconds = time.perf_counter() - t0
            if self.stats.peak:
                for p in self.peers:
                    p.peak_state = clone_state(p.model)
                    p.peak_round = t
            t1 = time.perf_counter()
            last = t == cfg.federation.rounds - 1
            evaluate_now = last or (t + 1) % cfg.federation.eval_every == 0
            record = self._round_record(train_seconds, self.transport.bytes_sent - bytes_before, evaluate_now)
            record["eval_seconds"] = time.perf_counter() - t1
            yield record

    def _round_record(self, train_seconds: float, wire_bytes: int, evaluate_now: bool) -> dict[str, Any]:
        s = self.stats
        peers: dict[str, Any] = {}
        for p in self.peers:
            entry: dict[str, Any] = {"arch": p.arch}
            if evaluate_now:
                entry["global_acc"] = evaluate(p.model, self.x_test, self.y_test)
                entry["local_acc"] = evaluate(p.model, p.x_local_test, p.y_local_test)
            if p.peak_state is not None:
                if s.peak or p.peak_metrics is None:
                    peak_model = copy.deepcopy(p.model)
                    peak_model.load_state_dict(p.peak_state)
                    p.peak_metrics = (
                        evaluate(peak_model, self.x_test, self.y_test),
                        evaluate(peak_model, p.x_local_test, p.y_local_test),
                    )
                entry["peak_global_acc"], entry["peak_local_acc"] = p.peak_metrics
                entry["peak_round"] = p.peak_round
            entry.update(self.trainer.peer_status(p.peer_id))
            peers[str(p.peer_id)] = entry
        if self.server_model is not None and evaluate_now:
            server_acc = evaluate(self.server_model, self.x_test, self.y_test)
        else:
            server_acc = None

        def mean(key: str) -> float | None:
            vals = [e[key] for e in peers.values() if key in e and e[key] == e[key]]
            return sum(vals) / len(vals) if vals else None

        return {
            "round": s.round_index,
            "alpha": s.alpha,
            "peak": s.peak,
            "groups": s.groups,
            "phases": s.phases,
            "bytes": wire_bytes + s.extra_bytes,
            "seconds": train_seconds,
            "compute_seconds": s.compute_seconds,
            "crypto_seconds": s.crypto_seconds,
            "codec_seconds": s.codec_seconds,
            "mean_global_acc": mean("global_acc"),
            "mean_local_acc": mean("local_acc"),
            "mean_peak_global_acc": mean("peak_global_acc"),
            "mean_peak_local_acc": mean("peak_local_acc"),
            "server_global_acc": server_acc,
            "peers": peers,
        }


DataPhase = tuple[int, str, int]  # (peer whose data is read, "local" | "mutual", epochs)


class Strategy:
    """An algorithm on the engine: how a round's groups are chosen and what a
    group does.  Strategies never loop over rounds themselves."""

    name: str = "strategy"
    needs_homogeneous: bool = False
    uses_server: bool = False

    def select(self, num_peers: int, round_index: int) -> Sequence[Group]:
        """The round's groups, from public values only."""
        raise NotImplementedError

    def data_phases(self, group: Group) -> Sequence[DataPhase]:
        """(peer, "local" | "mutual", epochs) for each phase of ``group`` that reads
        a peer's private data -- what a privacy planner calibrates noise to."""
        raise NotImplementedError

    def run_group(self, engine: RoundEngine, group: Group) -> dict[str, Any]:
        raise NotImplementedError


StrategyFactory = Callable[[RunConfig], Strategy]
