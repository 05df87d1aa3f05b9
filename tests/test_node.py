"""Peer nodes: each holds only its own state, acts only on messages that arrived."""

from __future__ import annotations

import threading

import pytest
import torch
from _runs import config_with, strip_seconds

from secure_dfml._run import build_federation, merge_round
from secure_dfml.crypto import MissingKeyError
from secure_dfml.errors import TransportError
from secure_dfml.transport import Message

BASE = {
    "federation": {"rounds": 3, "peers": 6, "participants": 4},
    "data": {"name": "digits", "dirichlet_alpha": 0.3, "auditor_pool": 100},
    "models": {"mix": ["mlp", "cnn-small"]},
    "dfml": {"ml_epochs": 1, "period": 3},
}


def cfg_with(**sections):
    return config_with(BASE, **sections)



def drive(node, program, messages_for):
    """Run one role program, answering each request with ``messages_for(request)``."""
    try:
        req = next(program)
        while True:
            req = program.send(messages_for(req))
    except StopIteration as stop:
        return stop.value


def test_a_node_holds_only_its_own_identity_and_endpoint():
    fed = build_federation(cfg_with())
    a, b = fed.nodes[0], fed.nodes[1]
    a.begin_round(0)
    with pytest.raises(MissingKeyError):  # its channel cannot seal as another peer
        a.channel.seal(b"x", sender=1, recipient=0, round_index=0, kind="model")
    with pytest.raises(TransportError, match="only as itself"):  # nor its endpoint send as one
        a.endpoint.send(Message(1, 2, 0, "model", b"x"))
    assert a.state is not b.state and a.trainer is not b.trainer and a.channel is not b.channel
    assert a.state.x_train.data_ptr() != b.state.x_train.data_ptr()


def test_bad_messages_are_rejected_and_change_nothing():
    fed = build_federation(cfg_with())
    agg, good, other = fed.nodes[0], fed.nodes[1], fed.nodes[2]
    assert fed.directory.archs[1] == "cnn-small" and fed.directory.archs[2] == "mlp"
    for n in (agg, good, other):
        n.begin_round(0)
    schemas = fed.directory.schemas

    def receive_from_1():
        program = agg.receive_states("model", [1], 1.0, lambda s: schemas[s])
        return drive(agg, program, lambda req: agg.endpoint.receive(round_index=0, kind=req.kind, senders=req.senders, timeout=0))

    before = {k: v.clone() for k, v in agg.model.state_dict().items()}
    # garbage bytes claiming to come from peer 1
    fed.hub.endpoint(1).send(Message(sender=1, recipient=0, round_index=0, kind="model", data=b"\x00" * 64))
    assert receive_from_1() == {} and agg.rejected_messages == 1
    # a correctly sealed payload whose tensors do not match peer 1's declared architecture
    good.send_state(0, "model", other.model.state_dict())
    assert receive_from_1() == {} and agg.rejected_messages == 2
    # an envelope sealed by peer 2 but carried as if from peer 1
    other.send_state(0, "model", good.model.state_dict())
    raw = fed.hub.endpoint(0).receive(round_index=0, kind="model", senders=[2], timeout=0)
    fed.hub.endpoint(1).send(Message(1, 0, 0, "model", raw[0].data))
    assert receive_from_1() == {} and agg.rejected_messages == 3
    # and a valid message is still accepted afterwards, bit for bit; nothing else changed
    good.send_state(0, "model", good.model.state_dict())
    got = receive_from_1()
    assert all(torch.equal(got[1][k], v) for k, v in good.model.state_dict().items())
    assert all(torch.equal(before[k], v) for k, v in agg.model.state_dict().items())


def test_nodes_on_threads_equal_the_simulation():
    """Each node on its own thread with blocking, bounded receives (nothing is
    shared but the transport) gives the simulation's metrics exactly."""
    cfg = cfg_with(privacy={"enabled": True, "epsilon": 4.0})
    sim = build_federation(cfg)
    expected = [strip_seconds(r) for r in sim.rounds()]

    threaded = build_federation(cfg)
    reports = {n.peer_id: [] for n in threaded.nodes}
    errors = []

    def run(node):
        try:
            for t in range(cfg.federation.rounds):
                reports[node.peer_id].append(node.run_round(t))
        except BaseException as exc:  # pragma: no cover - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in threaded.nodes]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not errors and not any(th.is_alive() for th in threads)
    got = [
        strip_seconds(merge_round([reports[p][t] for p in reports], threaded.strategy.select(6, t), seconds=0.0))
        for t in range(cfg.federation.rounds)
    ]
    assert got == expected


def test_a_lost_return_leaves_the_sender_with_its_pre_round_model():
    cfg = cfg_with(federation={"rounds": 1}, dfml={"sender_timeout": 0.2, "return_timeout": 0.2})
    fed = build_federation(cfg)
    group = fed.strategy.select(6, 0)[0]
    sender = fed.nodes[group.senders[0]]
    before = {k: v.clone() for k, v in sender.model.state_dict().items()}
    sender.begin_round(0)
    program = fed.strategy.send(sender, group)
    # the aggregator never answers: every request gets nothing
    drive(sender, program, lambda req: [])
    assert all(torch.equal(before[k], v) for k, v in sender.model.state_dict().items())
    assert sender.log.adopted == []


def test_a_forged_message_never_stands_in_for_the_real_one():
    """Garbage claiming to be from the sender arrives first; the node rejects it
    and keeps waiting (same deadline) for the real model, which it then accepts."""
    fed = build_federation(cfg_with())
    agg, good = fed.nodes[0], fed.nodes[1]
    agg.begin_round(0)
    good.begin_round(0)
    good.send_state(0, "model", good.model.state_dict())
    real = fed.hub.endpoint(0).receive(round_index=0, kind="model", senders=[1], timeout=0)
    forged = Message(1, 0, 0, "model", b"\x01" * 200)
    answers = iter([[forged], real])
    requests = []

    def respond(req):
        requests.append(req)
        return next(answers, [])

    program = agg.receive_states("model", [1], 5.0, lambda s: fed.directory.schemas[s])
    got = drive(agg, program, respond)
    assert set(got) == {1} and agg.rejected_messages == 1
    assert [r.resume for r in requests] == [False, True]  # the second wait keeps the first deadline


def test_peers_of_one_architecture_start_from_one_public_initialisation():
    """Known defect 19: same-architecture peers started from unrelated random weights, so the first
    averages averaged unrelated models. The initialisation now derives from public values only."""
    from secure_dfml._run import init_seed, plan_federation

    cfg = config_with(BASE, models={"mix": ["mlp", "cnn-tiny"]}, federation={"peers": 4, "participants": 4})
    plan = plan_federation(cfg)
    states = [plan.peer_state(i) for i in range(4)]
    assert [s.arch for s in states] == ["mlp", "cnn-tiny", "mlp", "cnn-tiny"]

    def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
        return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))

    assert same(states[0].model, states[2].model) and same(states[1].model, states[3].model)
    assert same(states[0].model, plan.initial_model("mlp"))  # anyone can recompute it
    f = cfg.federation
    assert len({init_seed(f.id, f.seed, "mlp"), init_seed(f.id, f.seed + 1, "mlp"), init_seed("other", f.seed, "mlp"),
                init_seed(f.id, f.seed, "cnn-tiny")}) == 4  # another seed, federation or architecture: other weights
    other = plan_federation(config_with(BASE, models={"mix": ["mlp", "cnn-tiny"]},
                                        federation={"peers": 4, "participants": 4, "seed": f.seed + 1}))
    assert not same(other.peer_state(0).model, states[0].model)


def test_evaluation_on_a_public_sample_of_peers(tmp_path):
    """federation.eval_peers: only a public, seed-derived sample is evaluated per round (stated in the
    record as `evaluated`); the last round evaluates every peer."""
    from secure_dfml import run_federation
    from secure_dfml.protocol.selection import evaluation_sample
    from secure_dfml.rundir import read_metrics

    cfg = cfg_with(federation={"eval_peers": 2})
    run_federation(cfg, tmp_path / "run", plot=False)
    records = read_metrics(tmp_path / "run")
    f = cfg.federation
    for r in records[:-1]:
        want = evaluation_sample(federation_id=f.id, seed=f.seed, round_index=r["round"], num_peers=f.peers, size=2)
        assert r["evaluated"] == 2 and {int(p) for p, e in r["peers"].items() if "global_acc" in e} == want
    assert records[-1]["evaluated"] == f.peers
    assert len({frozenset(evaluation_sample(federation_id=f.id, seed=f.seed, round_index=t, num_peers=6, size=2))
                for t in range(20)}) > 1  # the sample changes from round to round
    with pytest.raises(Exception, match="eval_peers"):
        cfg_with(federation={"eval_peers": 7})
