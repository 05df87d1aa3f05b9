"""The Ray backend: peers as Ray actors exchanging envelope bytes only.

The endpoint's semantics (bounds, buffering, stale floor, bounded waits,
bytes-only deliveries) are tested without Ray; the slow tests start and stop a
local Ray and check that ``--backend ray`` gives the simulation's metrics."""

from __future__ import annotations

import json
import threading
import time

import pytest
import ray
from _runs import config_with, timeless_metrics
from typer.testing import CliRunner

from secure_dfml import run_federation
from secure_dfml.cli.main import app
from secure_dfml.config import dump_toml
from secure_dfml._fsutil import exclusive
from secure_dfml.errors import RunDirectoryError, TransportError
from secure_dfml.orchestration.ray_backend import run_federation_ray
from secure_dfml.privacy import PrivacyLedger
from secure_dfml.transport import Endpoint, Mailbox, Message, RayEndpoint, read_capture
from secure_dfml.transport._zmq import decode_header, encode_header

runner = CliRunner()

BASE = {
    "federation": {"id": "ray-test", "rounds": 3, "peers": 4, "participants": 4, "groups": 1},
    "data": {"name": "digits", "auditor_pool": 100},
    "models": {"mix": ["mlp-small", "cnn-tiny"]},
    "dfml": {"ml_epochs": 1, "period": 2, "local_epochs": 1, "sender_timeout": 60.0, "return_timeout": 120.0},
    "privacy": {"enabled": True, "epsilon": 4.0},
}


def deliver(box: Mailbox, sender: int, round_index: int, kind: str, data: bytes, recipient: int = 0) -> bool:
    return box.accept(encode_header(sender, recipient, round_index, kind), data)


# ----------------------------------------------------------------------------- the mailbox, no Ray


def test_mailbox_buffers_later_rounds_and_drops_stale_ones():
    box = Mailbox(peer_id=0, senders=[1, 2])
    assert deliver(box, 1, 3, "model", b"later")  # a later round waits for the receive that asks for it
    assert deliver(box, 2, 2, "model", b"now")
    assert deliver(box, 1, 2, "return", b"other kind")
    assert [m.data for m in box.take(round_index=2, kind="model", senders=[1, 2], timeout=0.0)] == [b"now"]
    box.drop_before(3)  # round 2's leftovers go; round 3's stay
    assert box.buffered == (1, len(b"later"))
    assert not deliver(box, 2, 2, "model", b"stale") and box.stale == 1
    got = box.take(round_index=3, kind="model", senders=[1], timeout=0.0)
    assert got == [Message(sender=1, recipient=0, round_index=3, kind="model", data=b"later")]
    assert box.take(round_index=2, kind="return", senders=[1], timeout=0.0) == []  # below the floor
    assert box.buffered == (0, 0)


def test_mailbox_is_bounded_and_refuses_what_is_not_a_well_formed_delivery():
    box = Mailbox(peer_id=0, senders=[1, 2], max_message_bytes=10, max_buffered_messages=2, max_buffered_bytes=12)
    assert not deliver(box, 1, 0, "model", b"x" * 11)  # over max_message_bytes
    assert not deliver(box, 3, 0, "model", b"x")  # not a peer it hears from
    assert not deliver(box, 1, 0, "model", b"x", recipient=2)  # addressed to someone else
    assert not box.accept(b"garbage", b"x")
    assert not box.accept(encode_header(1, 0, 0, "model")[:-1], b"x")
    assert not box.accept("a str", b"x") and not box.accept(encode_header(1, 0, 0, "model"), bytearray(b"x"))
    assert box.rejected == 7 and box.buffered == (0, 0)
    assert deliver(box, 1, 0, "model", b"x" * 10)
    assert not deliver(box, 2, 0, "model", b"x" * 3)  # bytes bound: 10 + 3 > 12
    assert deliver(box, 2, 0, "model", b"x" * 2)
    assert not deliver(box, 2, 1, "model", b"x")  # count bound
    assert box.rejected == 9 and box.buffered == (2, 12)


def test_mailbox_waits_are_bounded_and_end_once_every_sender_has_arrived():
    box = Mailbox(peer_id=0, senders=[1, 2])
    t0 = time.monotonic()
    assert box.take(round_index=0, kind="model", senders=[1], timeout=0.2) == []
    assert 0.15 <= time.monotonic() - t0 < 2.0

    def later():
        time.sleep(0.1)
        deliver(box, 1, 0, "model", b"a")
        deliver(box, 2, 0, "model", b"b")

    th = threading.Thread(target=later)
    t0 = time.monotonic()
    th.start()
    got = box.take(round_index=0, kind="model", senders=[1, 2], timeout=30.0)
    th.join()
    assert sorted(m.sender for m in got) == [1, 2] and time.monotonic() - t0 < 10.0
    box.close()
    with pytest.raises(TransportError):
        box.take(round_index=0, kind="model", senders=[1], timeout=0.0)


# ----------------------------------------------------------------------------- the endpoint, fake actor handles


class _Remote:
    def __init__(self, calls: list[tuple], target: RayEndpoint | None = None) -> None:
        self.calls, self.target = calls, target

    def remote(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        if self.target is not None:
            self.target.deliver(*args)
        return len(self.calls)  # stands in for an object ref


class FakeActor:
    """An actor handle whose ``deliver.remote`` records its arguments (and may hand them on)."""

    def __init__(self, target: RayEndpoint | None = None) -> None:
        self.calls: list[tuple] = []
        self.deliver = _Remote(self.calls, target)


def test_the_endpoint_hands_the_recipient_actor_only_a_header_and_the_envelope_bytes():
    actors = {1: FakeActor(), 2: FakeActor()}
    tapped = []
    ep = RayEndpoint(peer_id=0, peers=actors, max_message_bytes=100, tap=lambda d, m: tapped.append((d, m)))
    assert isinstance(ep, Endpoint)
    ep.send(Message(0, 2, 5, "model", b"sealed envelope"))
    assert actors[1].calls == []
    (args, kwargs), = actors[2].calls
    assert kwargs == {} and [type(a) for a in args] == [bytes, bytes]
    assert decode_header(args[0]) == (0, 2, 5, "model") and args[1] == b"sealed envelope"
    assert ep.bytes_sent == len(b"sealed envelope") and tapped == [("sent", Message(0, 2, 5, "model", b"sealed envelope"))]
    for bad in (Message(1, 2, 0, "model", b"x"),  # not as itself
                Message(0, 0, 0, "model", b"x"),  # not to itself / unknown recipient
                Message(0, 7, 0, "model", b"x"),
                Message(0, 1, 0, "model", b"x" * 101),  # over max_message_bytes
                Message(0, 1, 0, "model", bytearray(b"x")),  # only bytes travel
                Message(0, 1, 0, "Bad Kind", b"x")):
        with pytest.raises(TransportError):
            ep.send(bad)
    assert actors[1].calls == [] and ep.bytes_sent == len(b"sealed envelope")


def test_two_endpoints_exchange_messages_through_their_actors_mailboxes():
    actor_of_a, actor_of_b = FakeActor(), FakeActor()
    a = RayEndpoint(peer_id=0, peers={1: actor_of_b})
    b = RayEndpoint(peer_id=1, peers={0: actor_of_a})
    actor_of_a.deliver.target, actor_of_b.deliver.target = a, b
    a.send(Message(0, 1, 0, "model", b"to b"))
    b.send(Message(1, 0, 1, "return", b"later round for a"))
    b.send(Message(1, 0, 0, "return", b"to a"))
    assert [m.data for m in b.receive(round_index=0, kind="model", senders=[0], timeout=1.0)] == [b"to b"]
    assert [m.data for m in a.receive(round_index=0, kind="return", senders=[1], timeout=1.0)] == [b"to a"]
    a.drop_before(1)
    assert [m.data for m in a.receive(round_index=1, kind="return", senders=[1], timeout=0.0)] == [b"later round for a"]
    a.close()
    with pytest.raises(TransportError):
        a.send(Message(0, 1, 2, "model", b"x"))


def test_unfinished_deliveries_are_bounded_and_failed_ones_counted(monkeypatch):
    import secure_dfml.transport._ray as ray_transport

    monkeypatch.setattr(ray_transport, "SEND_RETRY_SECONDS", 0.01)
    waits = []

    def stuck(pending, timeout, at_least):  # nothing ever finishes
        waits.append((len(pending), timeout, at_least))
        return pending, []

    ep = RayEndpoint(peer_id=0, peers={1: FakeActor()}, max_in_flight=2, settle=stuck)
    ep.send(Message(0, 1, 0, "model", b"a"))
    ep.send(Message(0, 1, 0, "model", b"b"))
    with pytest.raises(TransportError, match="unfinished"):
        ep.send(Message(0, 1, 0, "model", b"c"))
    assert waits[-1] == (2, 0.01, 1) and ep.bytes_sent == 2

    def failing(pending, timeout, at_least):
        return [], [f"ActorDiedError: ref {r}" for r in pending]

    ep = RayEndpoint(peer_id=0, peers={1: FakeActor()}, max_in_flight=1, settle=failing)
    for data in (b"a", b"b", b"c"):
        ep.send(Message(0, 1, 0, "model", data))  # the recipient's actor is gone: a missing message, not an error
    assert ep.flush() == 0 and ep.failed_deliveries == 3


def test_ray_options_only_apply_with_the_ray_backend_and_ray_runs_are_not_resumed(tmp_path):
    result = runner.invoke(app, ["run", "--address", "auto", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--address only apply with --backend ray" in result.output
    result = runner.invoke(app, ["run", "--backend", "ray", "--resume", str(tmp_path / "x")])
    assert result.exit_code == 2 and "cannot be resumed" in result.output


# ----------------------------------------------------------------------------- a local Ray (slow)


@pytest.fixture
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, address="local")
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_ray_actors_give_the_simulations_metrics_and_a_run_directory_of_the_same_layout(tmp_path, local_ray):
    """4 peers as 4 Ray actors (digits, 3 rounds, DP, NaCl envelopes with keys
    generated inside each actor) give exactly the simulation's metrics."""
    cfg = config_with(BASE)
    sim = run_federation(cfg, tmp_path / "sim", plot=False)
    summary = run_federation_ray(cfg, tmp_path / "ray", num_cpus_per_peer=0.25, plot=False)
    assert timeless_metrics(tmp_path / "ray") == timeless_metrics(tmp_path / "sim")
    assert summary["mean_global_acc"] == sim["mean_global_acc"] and summary["rejected_messages"] == 0
    assert "Ray actors" in summary["transport"] and "4 actor(s)" in summary["transport"]
    assert "generated inside each peer's Ray actor" in summary["channel_description"]
    assert ray.is_initialized()  # the caller's session is left as it was
    run = tmp_path / "ray"
    for name in ("config.toml", "metrics.jsonl", "summary.json", "manifest.json"):
        assert (run / name).is_file()
    assert sorted(p.name for p in (run / "models").glob("*_final.safetensors")) == [
        f"peer_{i:03d}_final.safetensors" for i in range(4)
    ]
    assert sorted(p.name for p in (run / "views").rglob("*.safetensors")) == sorted(
        p.name for p in (tmp_path / "sim" / "views").rglob("*.safetensors")
    )
    ledgers = sorted((run / "ledgers").glob("peer_*.json"))
    assert len(ledgers) == 4
    for led in ledgers:
        PrivacyLedger.load(led)  # verifies every entry with the accountant
    captured = read_capture(run / "capture")
    simulated = read_capture(tmp_path / "sim" / "capture")
    key = [(c.round_index, c.sender, c.recipient, c.kind) for c in captured]
    assert key == [(c.round_index, c.sender, c.recipient, c.kind) for c in simulated]
    assert [len(c.data()) for c in captured] == [len(c.data()) for c in simulated]  # the same envelopes' sizes
    assert not list(run.rglob("*.key")) and not (tmp_path / "ray.partial").exists()
    # one writer per lifetime ledger: a peer whose state directory is in use refuses to start, and says why
    with exclusive(tmp_path / "state" / "peer_001" / "lock", "a peer process"):
        with pytest.raises(RunDirectoryError, match="peer_001 of peer 1 is in use"):
            run_federation_ray(cfg, tmp_path / "again", state_root=tmp_path / "state", num_cpus_per_peer=0.25)
    assert not (tmp_path / "again.partial").exists() and not (tmp_path / "again").exists()


@pytest.mark.slow
def test_the_cli_starts_a_local_ray_itself_and_shuts_it_down_after(tmp_path):
    """`secure-dfml run --backend ray` without --address (DP off, two peers per
    actor) starts its own Ray, prints a line per round, gives the simulation's
    metrics and leaves no Ray behind."""
    assert not ray.is_initialized()
    base = {name: section for name, section in BASE.items() if name != "privacy"}  # DP off
    cfg = config_with(base, federation={"rounds": 2})
    run_federation(cfg, tmp_path / "sim", plot=False)
    path = tmp_path / "fed.toml"
    path.write_text(dump_toml(cfg))
    result = runner.invoke(app, ["run", "--config", str(path), "--out", str(tmp_path / "ray"), "--backend", "ray",
                                 "--ray-peers-per-actor", "2"])
    assert result.exit_code == 0, result.output
    assert "round 1/2:" in result.output and "round 2/2:" in result.output
    assert not ray.is_initialized()
    assert timeless_metrics(tmp_path / "ray") == timeless_metrics(tmp_path / "sim")
    summary = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert "a local Ray: 2 actor(s), 2 peer(s) per actor" in summary["transport"]
