"""Per-peer privacy ledger: every mechanism, recorded before its output is used.

Rules the ledger enforces:

* :meth:`PrivacyLedger.record` computes what the peer would have spent with the
  new mechanism; if that exceeds the target epsilon (at the peer's delta) it
  raises :class:`BudgetExceededError` and records nothing.
* Otherwise the entry is appended and the whole ledger is written atomically
  (temporary file in the same directory, ``fsync``, ``os.replace``, directory
  ``fsync``) *before* ``record`` returns, i.e. before the caller runs the
  mechanism.  A crash during the write leaves the previous complete file; a
  crash after it leaves the spent budget on disk.  Budget is never rolled back:
  if the write fails the entry stays counted in memory and the caller must not
  run the mechanism.
* Each entry stores ``epsilon_after`` -- the epsilon of all entries up to and
  including it -- so the file alone can be re-checked: feed
  ``accountant_history(entries)`` to a fresh Opacus accountant of the recorded
  kind and ask for epsilon at the recorded delta (:meth:`PrivacyLedger.verify`).

File format (JSON, ``format = "secure-dfml-ledger"``, ``version = 2``)::

    {"format": ..., "version": 2, "peer_id": 3, "accountant": "rdp",
     "delta": 1e-05, "target_epsilon": 8.0,
     "entries": [{"index": 0, "round": 0, "phase": "local",
                  "noise_multiplier": 1.1, "sample_rate": 0.064, "steps": 16,
                  "epsilon_after": 0.53, "recorded_at": "2025-...Z",
                  "run": "<run id>", "prev": "<sha256>", "hash": "<sha256>"}, ...],
     "head_hash": "<sha256 of the newest entry>",
     "spent_epsilon": 0.53, "exhausted_round": null,
     "refusals": [{"round": 9, "phase": "mutual", "would_spend": 8.3}]}

Entries are hash-chained: each ``hash`` is sha256 over the entry's canonical
JSON including ``prev``, the previous entry's hash; the first entry's ``prev``
is a genesis hash that binds the peer id, delta and accountant.  Loading
checks the chain, so an entry edited, removed or reordered by hand, or a ledger
copied over another peer's, is refused by name; ``head_hash`` pins the whole
history for a manifest (a chain alone does not stop someone who rewrites every
hash -- the run's manifest and cross-checks against its metrics do).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from secure_dfml.privacy._accounting import Mechanism, accountant_spec, compute_epsilon
from secure_dfml.privacy._errors import BudgetExceededError, LedgerError, PrivacyValidationError

logger = logging.getLogger(__name__)

#: The neighbouring relation every epsilon here is for (the one Opacus' RDP and PRV
#: accountants analyse for the Poisson-subsampled Gaussian).  The sample rate
#: q = batch / n uses the peer's *declared* record count, which is public (the
#: peer directory), so q does not depend on the private data set; a replacement
#: (replace-one) is a removal plus an addition and is not accounted separately.
ADJACENCY = (
    "add/remove-one: neighbouring data sets differ by one record of this peer; the peer's record count n is "
    "public (declared), so the sampling rate batch/n reveals nothing"
)

LEDGER_FORMAT = "secure-dfml-ledger"
LEDGER_VERSION = 2  # 2: entries are hash-chained (prev, hash) and carry their run id
PHASES: tuple[str, ...] = ("local", "mutual", "class_prior")
_VERIFY_RTOL = 1e-6


@dataclass(frozen=True)
class LedgerEntry:
    """One recorded mechanism."""

    index: int
    round: int
    phase: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon_after: float
    recorded_at: str
    run: str = ""  # the run that charged it (a peer's ledger spans every run on its data)
    prev: str = ""  # hash of the previous entry (the chain's genesis for the first)
    hash: str = ""  # sha256 over this entry's fields and ``prev``

    @property
    def mechanism(self) -> Mechanism:
        return Mechanism(self.noise_multiplier, self.sample_rate, self.steps)


def genesis_hash(peer_id: int, delta: float, accountant: str) -> str:
    """Where a peer's chain starts: binds the chain to the peer, its delta and accountant
    (a ledger copied over another peer's, or re-accounted, breaks the chain)."""
    return hashlib.sha256(f"{LEDGER_FORMAT}|peer {peer_id}|delta {delta!r}|{accountant}".encode()).hexdigest()


def entry_hash(entry: LedgerEntry) -> str:
    """sha256 of an entry's canonical JSON (every field but ``hash``, ``prev`` included)."""
    fields = {k: v for k, v in asdict(entry).items() if k != "hash"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def ledger_path(ledger_dir: Path, peer_id: int) -> Path:
    """Where peer ``peer_id``'s ledger lives in a run's ledger directory."""
    return Path(ledger_dir) / f"peer_{peer_id}.json"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old or the new
    complete file, never a torn one, and the new one survives a power loss."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):  # not every platform can fsync a directory
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


class PrivacyLedger:
    """Ledger of one peer.  ``target_epsilon=None`` records without a cap."""

    def __init__(
        self,
        *,
        peer_id: int,
        target_epsilon: float | None,
        delta: float,
        accountant: str = "rdp",
        path: Path | None = None,
    ) -> None:
        accountant_spec(accountant)  # validates the name
        if target_epsilon is not None and not (target_epsilon > 0 and math.isfinite(target_epsilon)):
            raise PrivacyValidationError(f"target epsilon = {target_epsilon!r} is invalid: expected a number > 0.")
        if not 0 < delta < 1:
            raise PrivacyValidationError(f"delta = {delta!r} is invalid: expected a number in (0, 1).")
        self.peer_id = int(peer_id)
        self.target_epsilon = None if target_epsilon is None else float(target_epsilon)
        self.delta = float(delta)
        self.accountant = accountant
        self.path = None if path is None else Path(path)
        self._entries: list[LedgerEntry] = []
        self._refusals: list[dict[str, Any]] = []
        self._exhausted_round: int | None = None
        self.run_id = ""  # stamped on every entry recorded from now on

    # -- reading -----------------------------------------------------------

    @property
    def entries(self) -> tuple[LedgerEntry, ...]:
        return tuple(self._entries)

    @property
    def mechanisms(self) -> list[Mechanism]:
        return [e.mechanism for e in self._entries]

    def mechanisms_before(self, run_id: str) -> list[Mechanism]:
        """Mechanisms charged by runs other than ``run_id`` (what a run finds
        already spent when it starts; a resumed run keeps its own)."""
        return [e.mechanism for e in self._entries if e.run != run_id]

    @property
    def head_hash(self) -> str:
        """Hash of the newest entry (the genesis hash when there is none): the value
        a manifest or a signature pins the whole history with."""
        if self._entries:
            return self._entries[-1].hash
        return genesis_hash(self.peer_id, self.delta, self.accountant)

    @property
    def spent_epsilon(self) -> float:
        return self._entries[-1].epsilon_after if self._entries else 0.0

    @property
    def total_steps(self) -> int:
        return sum(e.steps for e in self._entries)

    @property
    def exhausted_round(self) -> int | None:
        return self._exhausted_round

    @property
    def refusals(self) -> tuple[Mapping[str, Any], ...]:
        return tuple(self._refusals)

    @property
    def status(self) -> str:
        if self._exhausted_round is None:
            return "active"
        return f"exhausted at round {self._exhausted_round}"

    def epsilon_with(self, extra: Iterable[Mechanism] = ()) -> float:
        """Epsilon the peer would have spent after also running ``extra``."""
        return compute_epsilon([*self.mechanisms, *extra], delta=self.delta, accountant=self.accountant)

    def would_exceed(self, mechanism: Mechanism) -> tuple[bool, float]:
        eps = self.epsilon_with([mechanism])
        return (self.target_epsilon is not None and eps > self.target_epsilon), eps

    # -- writing -----------------------------------------------------------

    def record(self, *, round_index: int, phase: str, mechanism: Mechanism) -> LedgerEntry:
        """Charge ``mechanism`` (before its output is used) and persist the ledger.

        Raises :class:`BudgetExceededError` (nothing recorded) if it would push
        the peer past its target, :class:`LedgerError` if persisting failed (the
        entry stays counted; do not run the mechanism)."""
        if phase not in PHASES:
            raise PrivacyValidationError(f"phase = {phase!r} is invalid: expected one of {', '.join(PHASES)}.")
        exceeds, eps = self.would_exceed(mechanism)
        if exceeds:
            err = BudgetExceededError(
                f"peer {self.peer_id}: {phase} phase of round {round_index} would spend epsilon {eps:.4g} > "
                f"target {self.target_epsilon:g} at delta {self.delta:g}; refused, nothing recorded."
            )
            err.would_spend = eps  # type: ignore[attr-defined]
            raise err
        entry = LedgerEntry(
            index=len(self._entries),
            round=int(round_index),
            phase=phase,
            noise_multiplier=float(mechanism.noise_multiplier),
            sample_rate=float(mechanism.sample_rate),
            steps=int(mechanism.steps),
            epsilon_after=float(eps),
            recorded_at=datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            run=self.run_id,
            prev=self.head_hash,
        )
        entry = dataclasses.replace(entry, hash=entry_hash(entry))
        self._entries.append(entry)
        self._persist()
        return entry

    def refuse(self, *, round_index: int, phase: str, would_spend: float) -> None:
        """Note that a phase was refused by the gate (not a mechanism: nothing ran)."""
        self._refusals.append({"round": int(round_index), "phase": phase, "would_spend": float(would_spend)})
        if self._exhausted_round is None:
            self._exhausted_round = int(round_index)
        self._persist()

    def save(self) -> None:
        """Persist the ledger now (atomically); a no-op for in-memory ledgers."""
        self._persist()

    def _persist(self) -> None:
        if self.path is None:
            return
        data = json.dumps(self.to_dict(), indent=2, sort_keys=False).encode("utf-8")
        try:
            atomic_write_bytes(self.path, data)
        except OSError as exc:
            raise LedgerError(
                f"could not persist the ledger of peer {self.peer_id} to {self.path}: {exc}; "
                "the mechanism must not run (its budget stays charged)."
            ) from exc

    # -- (de)serialisation -------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": LEDGER_FORMAT,
            "version": LEDGER_VERSION,
            "peer_id": self.peer_id,
            "accountant": self.accountant,
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "adjacency": ADJACENCY,
            "entries": [asdict(e) for e in self._entries],
            "head_hash": self.head_hash,
            "spent_epsilon": self.spent_epsilon,
            "total_steps": self.total_steps,
            "exhausted_round": self._exhausted_round,
            "refusals": list(self._refusals),
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, path: Path | None = None, verify: bool = True) -> PrivacyLedger:
        where = f"ledger {path}" if path is not None else "ledger"
        if not isinstance(raw, Mapping) or raw.get("format") != LEDGER_FORMAT:
            raise LedgerError(f"{where} is not a secure-dfml ledger (missing format = {LEDGER_FORMAT!r}).")
        if raw.get("version") != LEDGER_VERSION:
            raise LedgerError(f"{where} has version {raw.get('version')!r}; this build reads version {LEDGER_VERSION}.")
        try:
            ledger = cls(
                peer_id=int(raw["peer_id"]),
                target_epsilon=None if raw["target_epsilon"] is None else float(raw["target_epsilon"]),
                delta=float(raw["delta"]),
                accountant=str(raw["accountant"]),
                path=path,
            )
            entries = [_entry_from_dict(e) for e in raw["entries"]]
            exhausted = raw.get("exhausted_round")
            ledger._exhausted_round = None if exhausted is None else int(exhausted)
            ledger._refusals = [dict(r) for r in raw.get("refusals", [])]
        except (KeyError, TypeError, ValueError) as exc:
            raise LedgerError(f"{where} is malformed: {exc!r}") from exc
        prev = genesis_hash(ledger.peer_id, ledger.delta, ledger.accountant)
        for i, e in enumerate(entries):
            if e.index != i:
                raise LedgerError(f"{where}: entry {i} has index {e.index}; entries were removed or reordered.")
            if e.prev != prev or e.hash != entry_hash(e):
                raise LedgerError(
                    f"{where}: the hash chain breaks at entry {i} (round {e.round}, {e.phase}): the entry was edited, "
                    "removed, reordered, or the ledger belongs to another peer, delta or accountant."
                )
            prev = e.hash
        if raw.get("head_hash") not in (None, prev):
            raise LedgerError(f"{where}: head_hash does not match its entries; entries were cut or added.")
        ledger._entries = entries
        if verify:
            ledger.verify()
        return ledger

    @classmethod
    def load(cls, path: Path, *, verify: bool = True) -> PrivacyLedger:
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise LedgerError(f"ledger {path} does not exist.") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LedgerError(f"ledger {path} is unreadable: {exc}") from exc
        return cls.from_dict(raw, path=path, verify=verify)

    @classmethod
    def open(
        cls, path: Path, *, peer_id: int, target_epsilon: float | None, delta: float, accountant: str
    ) -> PrivacyLedger:
        """Resume the ledger at ``path`` if it exists (spent budget carries over),
        else start an empty one there."""
        path = Path(path)
        if not path.exists():
            return cls(peer_id=peer_id, target_epsilon=target_epsilon, delta=delta, accountant=accountant, path=path)
        ledger = cls.load(path)
        if ledger.peer_id != peer_id:
            raise LedgerError(f"ledger {path} belongs to peer {ledger.peer_id}, not peer {peer_id}.")
        if ledger.accountant != accountant or not math.isclose(ledger.delta, delta, rel_tol=1e-12):
            raise LedgerError(
                f"ledger {path} was kept with accountant {ledger.accountant!r} at delta {ledger.delta:g}; this run asks "
                f"for {accountant!r} at delta {delta:g}. Use a new run directory or the same privacy settings."
            )
        if ledger.target_epsilon != target_epsilon:
            logger.warning(
                "peer %d: resuming ledger %s with target epsilon %s (was %s); already spent %.4g",
                peer_id,
                path,
                target_epsilon,
                ledger.target_epsilon,
                ledger.spent_epsilon,
            )
            ledger.target_epsilon = target_epsilon
        return ledger

    def verify(self) -> float:
        """Recompute epsilon from the entries with Opacus' accountant and check
        every recorded ``epsilon_after``; returns the recomputed total."""
        where = f"ledger {self.path}" if self.path is not None else f"ledger of peer {self.peer_id}"
        mechs: list[Mechanism] = []
        eps = 0.0
        for e in self._entries:
            mechs.append(e.mechanism)
            eps = compute_epsilon(mechs, delta=self.delta, accountant=self.accountant)
            if not math.isclose(eps, e.epsilon_after, rel_tol=_VERIFY_RTOL, abs_tol=1e-12):
                raise LedgerError(
                    f"{where}: entry {e.index} records epsilon {e.epsilon_after!r} but its mechanisms give {eps!r} "
                    f"with the {self.accountant} accountant; the file was edited or written by another accountant."
                )
        if self.target_epsilon is not None and eps > self.target_epsilon * (1 + _VERIFY_RTOL):
            raise LedgerError(f"{where}: spent epsilon {eps:.4g} exceeds the target {self.target_epsilon:g}.")
        return eps

    def summary(self) -> dict[str, Any]:
        phases: dict[str, int] = {}
        for e in self._entries:
            phases[e.phase] = phases.get(e.phase, 0) + 1
        return {
            "adjacency": ADJACENCY,
            "peer_id": self.peer_id,
            "epsilon_spent": self.spent_epsilon,
            "epsilon_target": self.target_epsilon,
            "delta": self.delta,
            "accountant": self.accountant,
            "mechanisms": len(self._entries),
            "mechanisms_by_phase": phases,
            "steps": self.total_steps,
            "refused_phases": len(self._refusals),
            "status": self.status,
        }


def _entry_from_dict(raw: Mapping[str, Any]) -> LedgerEntry:
    phase = str(raw["phase"])
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}")
    entry = LedgerEntry(
        index=int(raw["index"]),
        round=int(raw["round"]),
        phase=phase,
        noise_multiplier=float(raw["noise_multiplier"]),
        sample_rate=float(raw["sample_rate"]),
        steps=int(raw["steps"]),
        epsilon_after=float(raw["epsilon_after"]),
        recorded_at=str(raw.get("recorded_at", "")),
        run=str(raw.get("run", "")),
        prev=str(raw["prev"]),
        hash=str(raw["hash"]),
    )
    entry.mechanism  # noqa: B018 -- validates sigma / q / steps
    return entry


def load_ledgers(directory: Path) -> list[PrivacyLedger]:
    """All ``peer_<id>.json`` ledgers in ``directory`` (sorted by peer id)."""
    directory = Path(directory)
    files = sorted(directory.glob("peer_*.json"), key=lambda p: _peer_key(p))
    return [PrivacyLedger.load(p) for p in files]


def _peer_key(p: Path) -> tuple[int, str]:
    stem = p.stem.removeprefix("peer_")
    return (int(stem), p.name) if stem.isdigit() else (1 << 30, p.name)


def ledger_summaries(ledgers: Sequence[PrivacyLedger]) -> list[dict[str, Any]]:
    return [led.summary() for led in ledgers]
