"""The per-peer ledger: hard gate, reproducibility from the file, atomic persistence."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant, RDPAccountant

from secure_dfml.errors import PrivacyError
from secure_dfml.privacy import (
    BudgetExceededError,
    LedgerError,
    Mechanism,
    PrivacyLedger,
    atomic_write_bytes,
    ledger_path,
    load_ledgers,
)

pytestmark = pytest.mark.filterwarnings("ignore:Optimal order:UserWarning", "ignore::RuntimeWarning")

OPACUS = {"rdp": RDPAccountant, "prv": PRVAccountant}


def epsilon_from_file(path: Path) -> float:
    """Recompute a ledger's epsilon from its JSON file alone, with Opacus."""
    raw = json.loads(path.read_text())
    merged: dict[tuple[float, float], int] = {}
    for e in raw["entries"]:
        key = (e["noise_multiplier"], e["sample_rate"])
        merged[key] = merged.get(key, 0) + e["steps"]
    acc = OPACUS[raw["accountant"]]()
    acc.history = [(s, q, n) for (s, q), n in merged.items() if n > 0]
    return float(acc.get_epsilon(raw["delta"])) if acc.history else 0.0


def new_ledger(tmp_path: Path, *, eps: float | None = 4.0, accountant: str = "rdp") -> PrivacyLedger:
    return PrivacyLedger(
        peer_id=3, target_epsilon=eps, delta=1e-5, accountant=accountant, path=ledger_path(tmp_path, 3)
    )


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_file_alone_reproduces_epsilon(tmp_path: Path, accountant: str) -> None:
    led = new_ledger(tmp_path, accountant=accountant)
    led.record(round_index=0, phase="local", mechanism=Mechanism(1.2, 0.064, 16))
    led.record(round_index=1, phase="class_prior", mechanism=Mechanism(12.0, 1.0, 1))
    led.record(round_index=1, phase="mutual", mechanism=Mechanism(1.2, 0.064, 32))
    led.record(round_index=4, phase="local", mechanism=Mechanism(1.2, 0.064, 16))
    path = ledger_path(tmp_path, 3)
    assert path.name == "peer_3.json"
    recomputed = epsilon_from_file(path)
    raw = json.loads(path.read_text())
    assert raw["spent_epsilon"] == pytest.approx(recomputed, rel=1e-9)
    assert raw["entries"][-1]["epsilon_after"] == pytest.approx(recomputed, rel=1e-9)
    loaded = PrivacyLedger.load(path)
    assert loaded.spent_epsilon == led.spent_epsilon
    assert [e.phase for e in loaded.entries] == ["local", "class_prior", "mutual", "local"]


def test_append_over_budget_is_refused_and_nothing_recorded(tmp_path: Path) -> None:
    led = new_ledger(tmp_path, eps=1.0)
    led.record(round_index=0, phase="local", mechanism=Mechanism(2.0, 0.05, 20))
    before = ledger_path(tmp_path, 3).read_bytes()
    with pytest.raises(BudgetExceededError, match="refused"):
        led.record(round_index=1, phase="mutual", mechanism=Mechanism(0.5, 0.5, 500))
    assert len(led.entries) == 1
    assert ledger_path(tmp_path, 3).read_bytes() == before
    assert isinstance(BudgetExceededError("x"), PrivacyError)


def test_refusal_marks_exhaustion_and_is_not_a_mechanism(tmp_path: Path) -> None:
    led = new_ledger(tmp_path, eps=1.0)
    led.refuse(round_index=5, phase="local", would_spend=1.3)
    led.refuse(round_index=7, phase="local", would_spend=1.3)
    assert led.status == "exhausted at round 5"
    loaded = PrivacyLedger.load(ledger_path(tmp_path, 3))
    assert loaded.entries == () and loaded.status == "exhausted at round 5" and len(loaded.refusals) == 2


phase_st = st.tuples(
    st.sampled_from(["local", "mutual", "class_prior"]),
    st.sampled_from([0.6, 0.9, 1.3, 2.5, 6.0]),  # sigma (a small pool keeps RDP evaluations cached)
    st.sampled_from([0.02, 0.1, 0.3, 1.0]),  # q
    st.integers(min_value=0, max_value=200),  # steps
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    eps=st.sampled_from([0.3, 1.0, 2.0, 4.0, 8.0]),
    delta=st.sampled_from([1e-6, 1e-5, 1e-4]),
    schedule=st.lists(phase_st, min_size=1, max_size=12),
)
def test_property_no_ledger_ever_exceeds_its_budget(
    tmp_path_factory: pytest.TempPathFactory, eps: float, delta: float, schedule: list[tuple[str, float, float, int]]
) -> None:
    path = tmp_path_factory.mktemp("prop") / "peer_0.json"
    led = PrivacyLedger(peer_id=0, target_epsilon=eps, delta=delta, path=path)
    admitted: list[Mechanism] = []
    for r, (phase, sigma, q, steps) in enumerate(schedule):
        mech = Mechanism(sigma, q, steps)
        try:
            led.record(round_index=r, phase=phase, mechanism=mech)
            admitted.append(mech)
        except BudgetExceededError:
            led.refuse(round_index=r, phase=phase, would_spend=0.0)
        assert led.spent_epsilon <= eps  # invariant after every step
    # gated phases are not recorded: the ledger holds exactly the admitted mechanisms
    assert [e.mechanism for e in led.entries] == admitted
    reloaded = PrivacyLedger.load(path)
    assert reloaded.spent_epsilon == led.spent_epsilon <= eps
    assert epsilon_from_file(path) == pytest.approx(led.spent_epsilon, rel=1e-9, abs=1e-12)


class Crash(Exception):
    pass


def test_crash_during_write_leaves_previous_ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    led = new_ledger(tmp_path)
    led.record(round_index=0, phase="local", mechanism=Mechanism(1.5, 0.1, 10))
    path = ledger_path(tmp_path, 3)
    before = path.read_bytes()

    real_fsync = os.fsync

    def torn_fsync(fd: int) -> None:  # the new data is half-written when the "power fails"
        os.ftruncate(fd, 17)
        raise Crash("power loss")

    monkeypatch.setattr(os, "fsync", torn_fsync)
    with pytest.raises(Crash):
        led.record(round_index=1, phase="local", mechanism=Mechanism(1.5, 0.1, 10))
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert path.read_bytes() == before  # never torn
    assert PrivacyLedger.load(path).spent_epsilon > 0  # previous state intact and readable
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # temp file cleaned up
    # in memory the charge stays (never rolled back): the caller must not run the mechanism
    assert len(led.entries) == 2


def test_crash_before_rename_and_oserror_become_ledger_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    led = new_ledger(tmp_path)
    led.record(round_index=0, phase="local", mechanism=Mechanism(1.5, 0.1, 10))
    before = ledger_path(tmp_path, 3).read_bytes()

    def failing_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(LedgerError, match="must not run"):
        led.record(round_index=1, phase="mutual", mechanism=Mechanism(1.5, 0.1, 20))
    monkeypatch.undo()
    assert ledger_path(tmp_path, 3).read_bytes() == before
    assert led.spent_epsilon > PrivacyLedger.load(ledger_path(tmp_path, 3)).spent_epsilon


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "f.json"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.json"]


def test_tampered_ledger_is_rejected(tmp_path: Path) -> None:
    led = new_ledger(tmp_path)
    led.record(round_index=0, phase="local", mechanism=Mechanism(1.5, 0.1, 50))
    path = ledger_path(tmp_path, 3)
    raw = json.loads(path.read_text())
    raw["entries"][0]["steps"] = 5  # pretend less was spent
    path.write_text(json.dumps(raw))
    with pytest.raises(LedgerError, match="edited"):
        PrivacyLedger.load(path)
    raw["entries"] = []
    raw["format"] = "something-else"
    path.write_text(json.dumps(raw))
    with pytest.raises(LedgerError, match="not a secure-dfml ledger"):
        PrivacyLedger.load(path)
    path.write_text("{ torn")
    with pytest.raises(LedgerError, match="unreadable"):
        PrivacyLedger.load(path)


def test_open_resumes_spent_budget(tmp_path: Path) -> None:
    led = new_ledger(tmp_path)
    led.record(round_index=0, phase="local", mechanism=Mechanism(1.5, 0.1, 50))
    path = ledger_path(tmp_path, 3)
    again = PrivacyLedger.open(path, peer_id=3, target_epsilon=4.0, delta=1e-5, accountant="rdp")
    assert again.spent_epsilon == led.spent_epsilon and len(again.entries) == 1
    with pytest.raises(LedgerError, match="delta"):
        PrivacyLedger.open(path, peer_id=3, target_epsilon=4.0, delta=1e-6, accountant="rdp")
    with pytest.raises(LedgerError, match="peer 3"):
        PrivacyLedger.open(path, peer_id=4, target_epsilon=4.0, delta=1e-5, accountant="rdp")


def test_load_ledgers_sorted_by_peer(tmp_path: Path) -> None:
    for pid in (10, 2, 0):
        PrivacyLedger(peer_id=pid, target_epsilon=1.0, delta=1e-5, path=ledger_path(tmp_path, pid)).save()
    assert [led.peer_id for led in load_ledgers(tmp_path)] == [0, 2, 10]


def test_uncapped_ledger_records_everything() -> None:
    led = PrivacyLedger(peer_id=0, target_epsilon=None, delta=1e-5)
    led.record(round_index=0, phase="local", mechanism=Mechanism(0.5, 1.0, 100))
    assert led.spent_epsilon > 50 and led.status == "active"


def _chained_ledger(tmp_path: Path, peer_id: int = 3) -> Path:
    path = ledger_path(tmp_path, peer_id)
    led = PrivacyLedger(peer_id=peer_id, target_epsilon=8.0, delta=1e-5, accountant="rdp", path=path)
    led.run_id = "run-a"
    for r in range(3):
        led.record(round_index=r, phase="mutual", mechanism=Mechanism(1.2, 0.05, 20))
    return path


FIELDS = ["round", "phase", "noise_multiplier", "sample_rate", "steps", "epsilon_after", "run", "recorded_at", "prev"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entry=st.integers(0, 2), field=st.sampled_from(FIELDS))
def test_any_edited_entry_breaks_the_hash_chain(tmp_path, entry, field):
    path = _chained_ledger(tmp_path)
    raw = json.loads(path.read_text())
    e = raw["entries"][entry]
    if isinstance(e[field], str):
        e[field] = ("mutual" if e[field] != "mutual" else "local") if field == "phase" else e[field] + "x"
    else:
        e[field] = e[field] * 10 + 1
    with pytest.raises(LedgerError):
        PrivacyLedger.from_dict(raw, verify=False)  # the chain alone refuses it, before any accounting


def test_noise_multiplied_and_epsilons_recomputed_is_still_refused(tmp_path):
    """The skeptic's edit: sigma x10 and epsilon_after recomputed to match -- the
    accountant agrees, the chain does not."""
    path = _chained_ledger(tmp_path)
    raw = json.loads(path.read_text())
    fake = PrivacyLedger(peer_id=3, target_epsilon=8.0, delta=1e-5, accountant="rdp")
    for e in raw["entries"]:
        e["noise_multiplier"] *= 10
        e["epsilon_after"] = fake.record(
            round_index=e["round"], phase=e["phase"], mechanism=Mechanism(e["noise_multiplier"], e["sample_rate"], e["steps"])
        ).epsilon_after
    with pytest.raises(LedgerError, match="hash chain breaks at entry 0"):
        PrivacyLedger.from_dict(raw)


@pytest.mark.parametrize("tamper", ["cut", "copied-to-other-peer", "other-delta", "head"])
def test_cut_copied_or_reaccounted_ledgers_are_refused(tmp_path, tamper):
    raw = json.loads(_chained_ledger(tmp_path).read_text())
    if tamper == "cut":
        raw["entries"] = raw["entries"][:1]  # the head hash pins the last entry
    elif tamper == "copied-to-other-peer":
        raw["peer_id"] = 5
    elif tamper == "other-delta":
        raw["delta"] = 1e-3
    else:
        raw["head_hash"] = "0" * 64
    with pytest.raises(LedgerError):
        PrivacyLedger.from_dict(raw)


def test_an_untouched_chained_ledger_loads_and_resumes(tmp_path):
    path = _chained_ledger(tmp_path)
    led = PrivacyLedger.open(path, peer_id=3, target_epsilon=8.0, delta=1e-5, accountant="rdp")
    led.run_id = "run-b"
    led.record(round_index=0, phase="local", mechanism=Mechanism(1.2, 0.05, 20))
    again = PrivacyLedger.load(path)
    assert [e.run for e in again.entries] == ["run-a"] * 3 + ["run-b"]
    assert again.entries[3].prev == again.entries[2].hash and again.head_hash == again.entries[3].hash


def test_every_ledger_and_summary_states_its_neighbouring_relation(tmp_path):
    path = _chained_ledger(tmp_path)
    raw = json.loads(path.read_text())
    assert raw["adjacency"].startswith("add/remove-one") and "public" in raw["adjacency"]
    assert PrivacyLedger.load(path).summary()["adjacency"] == raw["adjacency"]
