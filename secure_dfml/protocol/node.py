"""A peer node: the one implementation of a DFML peer.

A :class:`PeerNode` holds only its own :class:`PeerState` (model, private data,
generator), a :class:`Trainer` for its own data (its own privacy ledger), a
:class:`Channel` bound to its own identity (it can seal only as itself and
open only what is addressed to it), a transport :class:`Endpoint` bound to its
id, and the :class:`PublicDirectory` (architectures and declared sample
counts of every peer).  It learns about other peers only from messages that
arrived.

Each round, a node computes the selection itself from public values and runs
its *role programs* (sender, aggregator, CKKS key holder; a strategy defines
them).  A program is a generator that yields :class:`Recv` requests -- "the
messages of this kind from these senders, waiting at most this long" -- and is
sent back the messages that arrived.  That keeps the node independent of how
it is driven:

* :func:`run_round_simulated` (``secure-dfml run``) runs every node of a
  federation in one thread over the in-memory transport, as a discrete-event
  simulation: a request is answered as soon as its messages are there, and a
  request that can never be satisfied times out in deadline order;
* :meth:`PeerNode.run_round` (threads, processes over ZeroMQ) answers each
  request with a blocking, bounded ``endpoint.receive``.

With the same config and seed both give the same metrics (research mode):
every result depends only on the node's own state and on which messages
arrived, and messages are always processed in the group's public order.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from secure_dfml.config import RunConfig
from secure_dfml.crypto.codec import Schema, decode_state, encode_state
from secure_dfml.errors import SecureDFMLError
from secure_dfml.models import FeatureCache
from secure_dfml.protocol._interfaces import Channel, PeerState, PhaseReport, Trainer
from secure_dfml.protocol.schedule import alpha_at, is_peak
from secure_dfml.protocol.selection import Group, evaluation_sample
from secure_dfml.transport import Endpoint, Message

logger = logging.getLogger(__name__)
T = TypeVar("T")

CHECKPOINT_FORMAT = "secure-dfml-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(SecureDFMLError, ValueError):
    """A peer checkpoint is unreadable or belongs to another peer or federation."""


def safe_open_metadata(data: bytes) -> dict[str, str]:
    """The string metadata of a safetensors blob (its JSON header; no tensors parsed)."""
    if len(data) < 8:
        raise ValueError("too short for a safetensors file")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8 or n > 100_000_000:
        raise ValueError("safetensors header length out of range")
    header = json.loads(data[8 : 8 + n])
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ValueError("safetensors metadata is not a mapping")
    return {str(k): str(v) for k, v in meta.items()}


@dataclass(frozen=True)
class Recv:
    """A role program's request: messages of ``kind`` from ``senders`` this round,
    waiting at most ``timeout`` seconds -- or, with ``resume``, until the
    deadline of the program's previous request (after it rejected what came)."""

    kind: str
    senders: tuple[int, ...]
    timeout: float
    resume: bool = False


Program = Generator[Recv, list[Message], None]


@dataclass(frozen=True)
class PublicDirectory:
    """What every peer knows about every other: public by construction.

    ``archs[i]`` and ``num_train[i]`` are peer ``i``'s architecture and declared
    training-set size (the averaging weight; see SECURITY.md); ``schemas`` the
    tensor layout a model of each peer must have.  ``server_id`` is the virtual
    server of ``fedavg-central`` (no data), if any.
    """

    federation_id: str
    archs: tuple[str, ...]
    num_train: tuple[int, ...]
    schemas: Mapping[int, Schema]
    server_id: int | None = None

    @property
    def num_peers(self) -> int:
        """Peers with data (the server, if any, is not counted)."""
        return len(self.archs) - (1 if self.server_id is not None else 0)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor | FeatureCache, y: torch.Tensor, batch_size: int = 2048) -> float:
    """Accuracy of ``model`` on (x, y); NaN for an empty set.  With a
    :class:`~secure_dfml.models.FeatureCache` for ``x`` a model with a fixed
    front end reads the cached features (computed once) instead of recomputing them."""
    if len(y) == 0:
        return float("nan")
    net, inputs = x.inputs(model) if isinstance(x, FeatureCache) else (model, x)
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(y), batch_size):
        correct += int((net(inputs[start : start + batch_size]).argmax(1) == y[start : start + batch_size]).sum())
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
    (seed, round, sender, recipient, kind); the sender's bytes still count."""
    p = cfg.dfml.drop_probability
    if p <= 0:
        return False
    key = f"{cfg.federation.seed}|{round_index}|{sender}|{recipient}|{kind}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") / 2**64 < p


@dataclass
class RoundLog:
    """What one node did in one round, as it saw it."""

    round_index: int
    alpha: float
    peak: bool
    phases: list[dict[str, Any]] = field(default_factory=list)
    groups: list[dict[str, Any]] = field(default_factory=list)  # groups this node aggregated
    adopted: list[int] = field(default_factory=list)  # aggregators whose returned model this node adopted
    compute_seconds: float = 0.0
    crypto_seconds: float = 0.0
    codec_seconds: float = 0.0
    extra_bytes: int = 0
    rejected: int = 0


class PeerNode:
    """One peer.  Everything it touches is its own or public."""

    def __init__(
        self,
        *,
        cfg: RunConfig,
        state: PeerState,
        directory: PublicDirectory,
        strategy: Any,
        trainer: Trainer,
        channel: Channel,
        endpoint: Endpoint,
        model_factory: Callable[[str], nn.Module],
        x_test: torch.Tensor,
        y_test: torch.Tensor,
        averager: Any = None,
        test_inputs: FeatureCache | None = None,
    ) -> None:
        """``test_inputs``: the feature cache of ``x_test`` (one per federation,
        shared by the nodes of a process); by default the node makes its own."""
        if endpoint.peer_id != state.peer_id:
            raise SecureDFMLError(f"peer {state.peer_id} was given the endpoint of peer {endpoint.peer_id}")
        self.cfg = cfg
        self.state = state
        self.peer_id = state.peer_id
        self.directory = directory
        self.strategy = strategy
        self.trainer = trainer
        self.channel = channel
        self.endpoint = endpoint
        self.model_factory = model_factory
        self.x_test = x_test
        self.y_test = y_test
        if test_inputs is None:
            test_inputs = FeatureCache(x_test, enabled=cfg.federation.feature_cache)
        elif test_inputs.x is not x_test:
            raise SecureDFMLError("test_inputs must be the feature cache of x_test")
        self.test_inputs = test_inputs
        self.averager = averager
        self.completed_rounds = 0
        self.rejected_messages = 0
        self._active = False  # whether a role program ran in this round
        self._diverged = False
        self._status: dict[str, Any] | None = None  # the trainer's privacy status, as of the last active round
        # What this node saw as a curious peer: the latest model of each sender it
        # received as aggregator ("received", sender) and its own returned model
        # ("returned", self) -> (round, state).
        self.views: dict[tuple[str, int], tuple[int, dict[str, torch.Tensor]]] = {}
        self._log: RoundLog | None = None
        self._lock = threading.Lock()  # role programs of one node may run on threads

    # -- helpers for role programs ---------------------------------------------------

    @property
    def log(self) -> RoundLog:
        assert self._log is not None, "only valid inside a round"
        return self._log

    @property
    def round_index(self) -> int:
        return self.log.round_index

    @property
    def model(self) -> nn.Module:
        return self.state.model

    def fresh_model(self, peer_id: int) -> nn.Module:
        """A new instance of ``peer_id``'s (public) architecture, to load received weights into."""
        return self.model_factory(self.directory.archs[peer_id])

    def timed_crypto(self, fn: Callable[[], T]) -> T:
        """``fn()``, its time counted as this round's crypto seconds."""
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            with self._lock:
                self.log.crypto_seconds += time.perf_counter() - t0

    def record_phase(self, phase: str, report: PhaseReport) -> PhaseReport:
        entry: dict[str, Any] = {"peer": self.peer_id, "phase": phase, "ran": report.ran, "steps": report.steps}
        if report.reason:
            entry["reason"] = report.reason
        if report.extra:
            entry.update(report.extra)
        with self._lock:
            self.log.compute_seconds += report.compute_seconds
            self.log.phases.append(entry)
        if not report.ran and report.reason:
            logger.info("round %d: peer %d %s phase skipped: %s", self.round_index, self.peer_id, phase, report.reason)
        return report

    def local_train(self, epochs: int) -> PhaseReport:
        report = self.trainer.local_train(self.state, epochs=epochs, round_index=self.round_index)
        return self.record_phase("local", report)

    def send_payload(self, recipient: int, kind: str, payload: bytes) -> None:
        """Seal ``payload`` for ``recipient`` and send it (a simulated link failure
        loses it after the bytes were spent)."""
        envelope = self.timed_crypto(
            lambda: self.channel.seal(payload, sender=self.peer_id, recipient=recipient, round_index=self.round_index, kind=kind)
        )
        message = Message(self.peer_id, recipient, self.round_index, kind, envelope)
        if link_fails(self.cfg, self.round_index, self.peer_id, recipient, kind):
            logger.info("round %d: %s %d->%d lost (simulated link failure)", self.round_index, kind, self.peer_id, recipient)
            with self._lock:
                self.log.extra_bytes += len(envelope)
            return
        self.endpoint.send(message)

    def send_state(self, recipient: int, kind: str, state: Mapping[str, torch.Tensor]) -> None:
        t0 = time.perf_counter()
        payload = encode_state(state)
        with self._lock:
            self.log.codec_seconds += time.perf_counter() - t0
        self.send_payload(recipient, kind, payload)

    def receive(
        self, kind: str, senders: Sequence[int], timeout: float, accept: Callable[[int, bytes], Any]
    ) -> Generator[Recv, list[Message], dict[int, Any]]:
        """Wait (bounded) for one message of ``kind`` from each of ``senders``; open
        each with the channel and ``accept(sender, payload)`` (e.g. the codec's
        schema check).  Returns ``{sender: accepted value}`` in ``senders`` order.
        Anything unexpected, unauthenticated or malformed is rejected, logged and
        changes no state."""
        got: dict[int, Any] = {}
        pending = list(senders)
        resume = False
        while pending:
            # a forged or malformed message never stands in for the real one: after
            # rejecting it, keep waiting for the rest until the same deadline
            messages = yield Recv(kind, tuple(pending), timeout, resume)
            resume = True
            if not messages:
                break  # the deadline passed
            for m in messages:
                if m.sender not in pending or m.sender in got:
                    self._reject(m, "unexpected or duplicate message")
                    continue
                try:
                    got[m.sender] = self.timed_crypto(
                        lambda m=m: self.channel.open_with(
                            m.data,
                            lambda payload: accept(m.sender, payload),
                            sender=m.sender,
                            recipient=self.peer_id,
                            round_index=self.round_index,
                            kind=kind,
                        )
                    )
                except SecureDFMLError as exc:
                    self._reject(m, str(exc))
            pending = [s for s in senders if s not in got]
        missing = pending
        if missing:
            logger.info("round %d: peer %d: %s from %s did not arrive in time; continuing without",
                        self.round_index, self.peer_id, kind, missing)
        return {s: got[s] for s in senders if s in got}

    def receive_states(
        self, kind: str, senders: Sequence[int], timeout: float, schema_of: Callable[[int], Schema]
    ) -> Generator[Recv, list[Message], dict[int, dict[str, torch.Tensor]]]:
        """Models from ``senders``, each checked against ``schema_of(sender)``."""
        got = yield from self.receive(kind, senders, timeout, lambda s, payload: decode_state(payload, schema_of(s)))
        return got

    def _reject(self, m: Message, why: str) -> None:
        with self._lock:
            self.log.rejected += 1
            self.rejected_messages += 1
        logger.warning("round %d: peer %d rejected %s message from %d: %s", self.round_index, self.peer_id, m.kind, m.sender, why)

    def note_view(self, view: str, peer: int, state: Mapping[str, torch.Tensor]) -> None:
        with self._lock:
            self.views[(view, peer)] = (self.round_index, dict(state))

    def adopt(self, state: Mapping[str, torch.Tensor], *, from_peer: int | None = None) -> None:
        self.model.load_state_dict(state)
        if from_peer is not None:
            with self._lock:
                self.log.adopted.append(from_peer)

    def report_group(self, group: Group, info: Mapping[str, Any]) -> None:
        with self._lock:
            self.log.groups.append({"aggregator": group.aggregator, "senders": list(group.senders), **info})

    # -- checkpoints -------------------------------------------------------------------

    def checkpoint_bytes(self) -> bytes:
        """Everything this node needs to continue after round ``completed_rounds - 1``,
        as one safetensors file (tensors + JSON metadata; never pickle): model,
        peak model and round, generator state, trainer state (the DP class
        prior), the replay-cache window, its views and counters."""
        p = self.state
        tensors: dict[str, torch.Tensor] = {f"model/{k}": v.detach().contiguous().clone() for k, v in p.model.state_dict().items()}
        if p.peak_state is not None:
            tensors.update({f"peak/{k}": v.contiguous() for k, v in p.peak_state.items()})
        tensors["rng/generator"] = p.generator.get_state()
        tensors.update({f"trainer/{k}": v.contiguous() for k, v in self.trainer.export_state(self.peer_id).items()})
        view_rounds: dict[str, int] = {}
        for (view, peer), (rnd, state) in self.views.items():
            view_rounds[f"{view}/{peer}"] = rnd
            tensors.update({f"view/{view}/{peer}/{k}": v.contiguous() for k, v in state.items()})
        replay = getattr(self.channel, "replay", None)
        meta = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "federation": self.directory.federation_id,
            "peer_id": self.peer_id,
            "arch": p.arch,
            "completed_rounds": self.completed_rounds,
            "peak_round": p.peak_round,
            "peak_metrics": list(p.peak_metrics) if p.peak_metrics is not None else None,
            "rejected_messages": self.rejected_messages,
            "views": view_rounds,
            "replay": replay.export_state() if replay is not None else None,
        }
        return save_safetensors(tensors, metadata={"secure_dfml": json.dumps(meta, sort_keys=True)})

    def restore_checkpoint(self, data: bytes) -> int:
        """Load a checkpoint written by :meth:`checkpoint_bytes` (of this very peer
        and federation); returns the number of completed rounds."""
        try:
            meta = json.loads(safe_open_metadata(data)["secure_dfml"])
            tensors = load_safetensors(data)
        except (KeyError, ValueError, TypeError, RuntimeError, OSError) as exc:
            raise CheckpointError(f"peer {self.peer_id}: the checkpoint is unreadable ({exc}); remove it to start over") from None
        if meta.get("format") != CHECKPOINT_FORMAT or meta.get("version") != CHECKPOINT_VERSION:
            raise CheckpointError(f"peer {self.peer_id}: not a secure-dfml checkpoint (format {meta.get('format')!r})")
        if meta.get("peer_id") != self.peer_id or meta.get("federation") != self.directory.federation_id:
            raise CheckpointError(
                f"checkpoint belongs to peer {meta.get('peer_id')} of federation {meta.get('federation')!r}, "
                f"not peer {self.peer_id} of {self.directory.federation_id!r}"
            )
        p = self.state

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        try:
            p.model.load_state_dict(part("model/"))
            peak = part("peak/")
            p.peak_state = peak or None
            p.generator.set_state(tensors["rng/generator"])
        except (RuntimeError, KeyError) as exc:
            raise CheckpointError(f"peer {self.peer_id}: checkpoint does not fit this peer's model ({exc})") from None
        p.peak_round = meta["peak_round"]
        p.peak_metrics = tuple(meta["peak_metrics"]) if meta["peak_metrics"] is not None else None
        self.trainer.restore_state(self.peer_id, part("trainer/"))
        self.views = {}
        for key, rnd in meta["views"].items():
            view, peer = key.split("/")
            self.views[(view, int(peer))] = (int(rnd), part(f"view/{view}/{peer}/"))
        replay = getattr(self.channel, "replay", None)
        if replay is not None and meta.get("replay") is not None:
            replay.restore_state(meta["replay"])
        self.rejected_messages = int(meta["rejected_messages"])
        self.completed_rounds = int(meta["completed_rounds"])
        return self.completed_rounds

    # -- the round ---------------------------------------------------------------------

    def begin_round(self, t: int) -> None:
        self._log = RoundLog(t, alpha_at(t, self.cfg.dfml), is_peak(t, self.cfg.dfml))
        self._active = False
        self.endpoint.drop_before(t)
        self._bytes_before = self.endpoint.bytes_sent

    def programs(self, t: int) -> list[Program]:
        """This node's role programs in round ``t`` (none when it is idle)."""
        programs = list(self.strategy.programs(self, t))
        self._active = self._active or bool(programs)  # only a role program changes the model
        return programs

    def evaluated_in(self, t: int) -> bool:
        """Whether this node is in round ``t``'s public evaluation sample (``federation.eval_peers``)."""
        f = self.cfg.federation
        if f.eval_peers == 0 or self.peer_id >= f.peers:  # everyone; the fedavg-central server always
            return True
        return self.peer_id in evaluation_sample(federation_id=f.id, seed=f.seed, round_index=t, num_peers=f.peers,
                                                 size=f.eval_peers)

    def end_round(self, t: int, *, evaluate_now: bool | None = None) -> dict[str, Any]:
        """Peak snapshot, evaluation; returns this node's round report."""
        log = self.log
        p = self.state
        last = t == self.cfg.federation.rounds - 1
        if evaluate_now is None:
            evaluate_now = last or ((t + 1) % self.cfg.federation.eval_every == 0 and self.evaluated_in(t))
        entry: dict[str, Any] = {"arch": p.arch}
        if evaluate_now:
            entry["global_acc"] = evaluate(p.model, self.test_inputs, self.y_test)
            entry["local_acc"] = evaluate(p.model, p.inputs("local_test"), p.y_local_test)
        if log.peak:
            p.peak_state = clone_state(p.model)
            p.peak_round = t
            if evaluate_now:  # the peak model is the current one: its accuracy is known
                p.peak_metrics = (entry["global_acc"], entry["local_acc"])
            else:
                p.peak_metrics = None
        if p.peak_state is not None:
            if p.peak_metrics is None:
                peak_model = copy.deepcopy(p.model)
                peak_model.load_state_dict(p.peak_state)
                p.peak_metrics = (
                    evaluate(peak_model, self.test_inputs, self.y_test),
                    evaluate(peak_model, p.inputs("local_test"), p.y_local_test),
                )
            entry["peak_global_acc"], entry["peak_local_acc"] = p.peak_metrics
            entry["peak_round"] = p.peak_round
        if self._active:  # an idle node's model is as it was: checked when it last changed
            self._diverged = not all(bool(torch.isfinite(v).all()) for v in p.model.state_dict().values()
                                     if v.is_floating_point())
            if self._diverged:
                logger.warning("round %d: peer %d's model has non-finite weights (training diverged)", t, self.peer_id)
        if self._diverged:
            entry["diverged"] = True
        if self._active or self._status is None:  # an idle node's ledger did not change this round
            self._status = dict(self.trainer.peer_status(self.peer_id))
        entry.update(self._status)
        self.completed_rounds = t + 1
        return {
            "peer": self.peer_id,
            "round": t,
            "alpha": log.alpha,
            "peak": log.peak,
            "phases": log.phases,
            "groups": log.groups,
            "adopted": sorted(log.adopted),
            "bytes": (self.endpoint.bytes_sent - self._bytes_before if self._active else 0) + log.extra_bytes,
            "compute_seconds": log.compute_seconds,
            "crypto_seconds": log.crypto_seconds,
            "codec_seconds": log.codec_seconds,
            "rejected": log.rejected,
            "evaluated": evaluate_now,
            "entry": entry,
        }

    def run_round(self, t: int) -> dict[str, Any]:
        """Round ``t`` with blocking, bounded receives (threads and processes):
        role programs run concurrently, each on its own thread."""
        self.begin_round(t)
        t0 = time.perf_counter()
        programs = self.programs(t)
        if len(programs) == 1:
            self._drive(programs[0], t)
        elif programs:
            errors: list[BaseException] = []

            def drive(prog: Program) -> None:
                try:
                    self._drive(prog, t, slice_seconds=0.05)
                except BaseException as exc:  # noqa: BLE001 - re-raised below
                    errors.append(exc)

            threads = [threading.Thread(target=drive, args=(p,), daemon=True) for p in programs]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            if errors:
                raise errors[0]
        seconds = time.perf_counter() - t0
        report = self.end_round(t)
        report["seconds"] = seconds
        return report

    def _drive(self, program: Program, t: int, *, slice_seconds: float | None = None) -> None:
        """Answer ``program``'s requests with blocking, bounded receives.  With
        ``slice_seconds`` each wait is cut into slices, so that role programs on
        other threads of this node get the endpoint in between."""
        try:
            request = next(program)
            deadline = 0.0
            while True:
                if not request.resume:
                    deadline = time.monotonic() + request.timeout
                messages: list[Message] = []
                while True:
                    left = max(0.0, deadline - time.monotonic())
                    wait = left if slice_seconds is None else min(left, slice_seconds)
                    messages += self.endpoint.receive(
                        round_index=t, kind=request.kind, senders=request.senders, timeout=wait
                    )
                    if {m.sender for m in messages} >= set(request.senders) or wait >= left:
                        break
                request = program.send(messages)
        except StopIteration:
            return


def run_round_simulated(
    nodes: Sequence[PeerNode], t: int, endpoints: Mapping[int, Any]
) -> tuple[list[dict[str, Any]], float, float]:
    """Round ``t`` of every node in one thread (discrete-event simulation over
    in-memory endpoints): requests are answered as soon as their messages are
    all there, in a fixed order; when no request can be answered, the one with
    the earliest (virtual) deadline times out with what it has.  Returns the
    nodes' round reports, the round's wall seconds (training and exchange) and
    the seconds its evaluation took."""
    t0 = time.perf_counter()
    for n in nodes:
        n.begin_round(t)
    clock = 0.0
    # task: [order, node, program, request, deadline]
    tasks: list[list[Any]] = []
    order = 0

    def advance(task: list[Any], messages: list[Message] | None) -> bool:
        try:
            req = next(task[2]) if messages is None else task[2].send(messages)
        except StopIteration:
            return False
        task[3] = req
        if not req.resume:
            task[4] = clock + req.timeout
        return True

    for n in nodes:
        for prog in n.programs(t):
            task = [order, n, prog, None, 0.0]
            order += 1
            if advance(task, None):
                tasks.append(task)
    while tasks:
        progressed = False
        for task in list(tasks):
            req: Recv = task[3]
            ep = endpoints[task[1].peer_id]
            if ep.ready(round_index=t, kind=req.kind, senders=req.senders):
                msgs = ep.receive(round_index=t, kind=req.kind, senders=req.senders, timeout=0.0)
                if not advance(task, msgs):
                    tasks.remove(task)
                progressed = True
        if not progressed:
            task = min(tasks, key=lambda k: (k[4], k[0]))
            clock = max(clock, task[4])
            req = task[3]
            msgs = endpoints[task[1].peer_id].receive(round_index=t, kind=req.kind, senders=req.senders, timeout=0.0)
            if not advance(task, msgs):
                tasks.remove(task)
    seconds = time.perf_counter() - t0
    reports = [n.end_round(t) for n in nodes]
    return reports, seconds, time.perf_counter() - t0 - seconds


def merge_round(
    reports: Sequence[Mapping[str, Any]], groups: Sequence[Group], *, seconds: float, server_id: int | None = None
) -> dict[str, Any]:
    """One metrics record (the run directory's ``metrics.jsonl`` layout) from the
    round reports of the federation's nodes."""
    by_peer = {int(r["peer"]): r for r in reports}
    first = reports[0]
    info_by_aggregator: dict[int, dict[str, Any]] = {}
    for r in reports:
        for g in r["groups"]:
            info_by_aggregator[int(g["aggregator"])] = g
    adopted: dict[int, set[int]] = {}
    for r in reports:
        for a in r["adopted"]:
            adopted.setdefault(int(a), set()).add(int(r["peer"]))
    merged_groups = []
    phase_rank: dict[int, tuple[int, int]] = {}
    for gi, g in enumerate(groups):
        info = dict(info_by_aggregator.get(g.aggregator, {"aggregator": g.aggregator, "senders": list(g.senders), "aborted": True}))
        if g.senders:
            info["returned"] = sorted(s for s in adopted.get(g.aggregator, ()) if s in g.senders)
        merged_groups.append(info)
        for pos, p in enumerate(g.members):
            phase_rank.setdefault(p, (gi, pos))
    phases = [ph for r in reports for ph in r["phases"]]
    def rank(ph: Mapping[str, Any]) -> tuple[int, bool, int]:
        gi, pos = phase_rank.get(int(ph["peer"]), (len(groups), int(ph["peer"])))
        return gi, ph["phase"] == "mutual", pos

    phases.sort(key=rank)
    peers = {str(pid): by_peer[pid]["entry"] for pid in sorted(by_peer) if pid != server_id}
    server_acc = None
    if server_id is not None and server_id in by_peer:
        server_acc = by_peer[server_id]["entry"].get("global_acc")

    def mean(key: str) -> float | None:
        vals = [e[key] for e in peers.values() if key in e and e[key] == e[key]]
        return sum(vals) / len(vals) if vals else None

    return {
        "round": first["round"],
        "alpha": first["alpha"],
        "peak": first["peak"],
        "groups": merged_groups,
        "phases": phases,
        "bytes": sum(int(r["bytes"]) for r in reports),
        "seconds": seconds,
        "compute_seconds": sum(r["compute_seconds"] for r in reports),
        "crypto_seconds": sum(r["crypto_seconds"] for r in reports),
        "codec_seconds": sum(r["codec_seconds"] for r in reports),
        "mean_global_acc": mean("global_acc"),  # over the peers evaluated this round
        "mean_local_acc": mean("local_acc"),
        "evaluated": sum(1 for e in peers.values() if "global_acc" in e),
        "mean_peak_global_acc": mean("peak_global_acc"),
        "mean_peak_local_acc": mean("peak_local_acc"),
        "server_global_acc": server_acc,
        "peers": peers,
    }
