"""Fixed features (the scattering front end of the scatter-* models) computed once
per sample and reused: same results, same privacy, no per-model copies, and no
training state kept by an idle peer."""

from __future__ import annotations

import gc
import json
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from opacus.grad_sample.gsm_base import AbstractGradSampleModule
from safetensors.torch import load as load_safetensors
from sklearn.datasets import load_digits

from secure_dfml import config_from_dict
from secure_dfml._run import build_federation, run_federation
from secure_dfml.config import dump_toml
from secure_dfml.crypto import schema_of
from secure_dfml.errors import ConfigError, ModelError
from secure_dfml.models import (
    MODEL_REGISTRY,
    FeatureCache,
    FixedFrontEnd,
    OnFeatures,
    RoutedJoint,
    available_models,
    build_model,
    fixed_front,
)
from secure_dfml.models import _zoo
from secure_dfml.privacy import DPSGDSession, DPTrainer, clipped_sum_gradient
from secure_dfml.protocol._interfaces import PeerState
from secure_dfml.protocol._train import PlainTrainer, training_module
from secure_dfml.protocol.losses import JointModel, mutual_learning_loss
from secure_dfml.protocol.node import evaluate, safe_open_metadata

from _runs import config_with, timeless_metrics

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning", "ignore::FutureWarning")

SCATTER = ("scatter-linear", "scatter-cnn", "scatter-mlp")
BASE = {
    "federation": {"rounds": 3, "peers": 4, "participants": 4, "groups": 1},
    "data": {"name": "digits", "auditor_pool": 100},
    # a mixed group: three scatter models (one front end) and one on raw pixels
    "models": {"mix": ["scatter-linear", "scatter-cnn", "mlp-small", "scatter-mlp"]},
    "dfml": {"ml_epochs": 1, "period": 3, "batch_size": 64},
}
DP = {"enabled": True, "epsilon": 8.0, "class_prior": "dp"}


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0, torch.tensor(y, dtype=torch.long)


def model(name: str, seed: int = 0) -> torch.nn.Module:
    return build_model(name, input_shape=(1, 8, 8), num_classes=10, kind="image",
                       generator=torch.Generator().manual_seed(seed))


def peer_of(digits: tuple[torch.Tensor, torch.Tensor], arch: str, *, n: int = 300, cache: bool = True) -> PeerState:
    x, y = digits
    return PeerState(peer_id=0, arch=arch, model=model(arch), x_train=x[:n], y_train=y[:n],
                     x_local_test=x[n : n + 100], y_local_test=y[n : n + 100], num_classes=10,
                     generator=torch.Generator().manual_seed(3), cache_features=cache)


class CountingScatter:
    """Counts the samples the scattering front end is run on."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.samples = 0
        real = _zoo.Scattering.forward

        def forward(front: _zoo.Scattering, x: torch.Tensor) -> torch.Tensor:
            self.samples += int(x.shape[0])
            return real(front, x)

        monkeypatch.setattr(_zoo.Scattering, "forward", forward)


# -- the front end, generically -------------------------------------------------------


def test_scatter_models_declare_a_parameter_free_fixed_front_and_the_others_none(digits):
    x = digits[0][:50]
    for name in available_models("image"):
        m = model(name)
        front = fixed_front(m)
        if not name.startswith("scatter-"):
            assert front is None, name
            continue
        assert isinstance(front, FixedFrontEnd) and not list(front.parameters()) and not front.state_dict()
        assert torch.equal(m(x), m.forward_from_front(front(x)))  # exactly the model's own forward pass
        assert torch.equal(OnFeatures(m)(front(x)), m(x))
        assert list(OnFeatures(m).parameters()) == list(m.parameters())
    keys = {fixed_front(model(n, seed=i)).cache_key() for i, n in enumerate(SCATTER)}
    assert len(keys) == 1  # one front end for every scatter model of one input shape: features computed once
    other = build_model("scatter-linear", input_shape=(3, 8, 8), num_classes=10, kind="image",
                        generator=torch.Generator().manual_seed(0))
    assert fixed_front(other).cache_key() not in keys


def test_a_front_end_with_parameters_or_state_is_refused():
    class Bad(FixedFrontEnd):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

        def cache_key(self) -> object:
            return "bad"

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fixed_front = Bad()

        def forward_from_front(self, z: torch.Tensor) -> torch.Tensor:
            return z

    with pytest.raises(ModelError, match="fixed front end must have neither"):
        fixed_front(Net())


def test_one_filter_bank_per_shape_is_shared_by_every_model_and_never_sent():
    models = [model(n, seed=i) for i, n in enumerate(SCATTER * 4)]
    ptrs = {m.scatter.weight.data_ptr() for m in models}
    assert len(ptrs) == 1  # 12 models, one copy of the filters
    for m in models:
        assert not any(k.startswith("scatter") for k in m.state_dict())  # nothing of the front is sent or saved
    # the filters are still the Morlet bank the model always used
    s = models[0].scatter
    bank = _zoo.morlet_bank(2, 8, s.weight.shape[-1]).reshape(-1, 1, *s.weight.shape[-2:])
    assert torch.equal(s.weight, bank)


# -- the cache ---------------------------------------------------------------------------


def test_features_are_computed_once_per_sample_for_every_model(digits, monkeypatch):
    counter = CountingScatter(monkeypatch)
    x = digits[0][:700]
    cache = FeatureCache(x, batch_size=256)
    models = [model(n, seed=i) for i, n in enumerate(SCATTER * 2)] + [model("mlp-small")]
    for m in models:
        net, inp = cache.inputs(m)
        if fixed_front(m) is None:
            assert net is m and inp is x
        else:
            assert isinstance(net, OnFeatures) and inp.shape == (700, 17, 7, 7)
            assert torch.equal(net(inp[:64]), m(x[:64]))  # the cache is exact (same float32 ops)
    assert counter.samples == 700 + 6 * 64  # 700 once for the cache, the rest by the checks' own m(x)
    assert len(cache.cached_keys) == 1
    off = FeatureCache(x, enabled=False)
    assert off.inputs(models[0]) == (models[0], x)
    members, routes, tensors = cache.joint_inputs(models[:2] + models[-1:])
    assert routes == [0, 0, 1] and tensors[1] is x and len(tensors) == 2
    assert pickle.loads(pickle.dumps(cache)).features(fixed_front(models[0])).equal(cache.features(fixed_front(models[0])))


def test_training_and_evaluation_read_the_cache_and_never_rerun_the_front(digits, monkeypatch):
    cfg = config_from_dict({"dfml": {"batch_size": 32, "ml_epochs": 1}}).dfml
    peer = peer_of(digits, "scatter-cnn")
    counter = CountingScatter(monkeypatch)
    trainer = PlainTrainer(cfg, rounds=2)
    for r in range(2):
        assert trainer.local_train(peer, epochs=1, round_index=r).ran
        others = [model("scatter-mlp", seed=5), model("scatter-linear", seed=6), model("mlp-small", seed=7)]
        assert trainer.mutual_train(peer, [peer.model, *others], alpha=0.5, temperature=2.0, epochs=1,
                                    class_prior=None, round_index=r).ran
        evaluate(peer.model, peer.inputs("local_test"), peer.y_local_test)
        evaluate(peer.model, peer.inputs("local_test"), peer.y_local_test)
    assert counter.samples == 300 + 100  # the training set once and the local test set once, over everything


def test_plain_training_is_the_same_with_and_without_the_cache(digits):
    cfg = config_from_dict({"dfml": {"batch_size": 32, "ml_epochs": 1, "momentum": 0.9}}).dfml
    states = []
    for cache in (True, False):
        peer = peer_of(digits, "scatter-cnn", cache=cache)
        others = [model("scatter-mlp", seed=5), model("mlp-small", seed=7)]
        trainer = PlainTrainer(cfg, rounds=2)
        trainer.local_train(peer, epochs=1, round_index=0)
        trainer.mutual_train(peer, [peer.model, *others], alpha=0.5, temperature=2.0, epochs=1, class_prior=None,
                             round_index=1)
        acc = evaluate(peer.model, peer.inputs("local_test"), peer.y_local_test)
        states.append(([m.state_dict() for m in (peer.model, *others)], acc))
    (a, acc_a), (b, acc_b) = states
    assert acc_a == acc_b
    for sa, sb in zip(a, b, strict=True):
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=1e-6)


# -- privacy -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCATTER)
@pytest.mark.parametrize("mode", ["bk", "hooks"])
def test_dp_clipped_per_sample_gradient_is_the_same_from_cached_features(digits, name, mode):
    """The front has no parameters: the clipped (and summed) per-sample gradient of
    the full model on raw inputs equals that of the head on cached features."""
    x, y = digits[0][:40], digits[1][:40]
    m = model(name, seed=1)
    kw = dict(y=y, loss_fn=F.cross_entropy, batch_dim=0, max_grad_norm=0.1, mode=mode)
    raw = clipped_sum_gradient(m, x=x, **kw)
    net, feats = FeatureCache(x).inputs(m)
    cached = clipped_sum_gradient(net, x=feats, **kw)
    assert len(raw) == len(cached) == len(list(m.parameters()))
    for a, b in zip(raw, cached, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_dp_joint_step_of_a_mixed_group_is_the_same_from_cached_features(digits):
    """Mutual learning of scatter models and a raw-pixel model on one batch: the
    per-model clipped joint gradient, and the noisy step, are those without the cache."""
    x, y = digits[0][:40], digits[1][:40]
    models = [model(n, seed=i) for i, n in enumerate((*SCATTER, "mlp-small"))]

    def loss(out: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
        return mutual_learning_loss(list(out.unbind(0)), yy, alpha=0.5, temperature=2.0, class_prior=None)

    raw_joint = JointModel(models)
    routed, xs = training_module(FeatureCache(x), models)
    assert isinstance(routed, RoutedJoint) and len(xs) == 2
    groups = [[list(m.parameters()) for m in j.members] for j in (raw_joint, routed)]
    kw = dict(y=y, loss_fn=loss, batch_dim=1, max_grad_norm=0.3, mode="bk")
    a = clipped_sum_gradient(raw_joint, x=x, clip_groups=groups[0], **kw)
    b = clipped_sum_gradient(routed, x=xs, clip_groups=groups[1], **kw)
    for ga, gb in zip(a, b, strict=True):
        torch.testing.assert_close(ga, gb, rtol=0, atol=1e-6)
    noisy = []
    for module, inputs, g in ((raw_joint, x, groups[0]), (routed, xs, groups[1])):
        params = [p for p in module.parameters() if p.requires_grad]
        with DPSGDSession(module, torch.optim.SGD(params, lr=0.0), loss_fn=loss, batch_dim=1, noise_multiplier=1.0,
                          max_grad_norm=0.3, expected_batch_size=40, mode="bk",
                          noise_generator=torch.Generator().manual_seed(9), clip_groups=g) as session:
            noisy.append(session.noisy_gradient(inputs, y))
    for ga, gb in zip(*noisy, strict=True):
        torch.testing.assert_close(ga, gb, rtol=0, atol=1e-6)


def test_an_idle_peer_keeps_no_optimizer_or_opacus_state(digits):
    x, y = digits
    peers = [peer_of(digits, a) for a in ("scatter-cnn", "scatter-mlp")]
    peers[1] = PeerState(peer_id=1, arch="scatter-mlp", model=model("scatter-mlp", 2), x_train=x[400:700],
                         y_train=y[400:700], x_local_test=x[700:800], y_local_test=y[700:800], num_classes=10,
                         generator=torch.Generator().manual_seed(4))
    cfg = config_from_dict({"federation": {"peers": 2, "participants": 2, "rounds": 2},
                            "dfml": {"batch_size": 50, "local_epochs": 1, "ml_epochs": 1},
                            "privacy": {"enabled": True, "epsilon": 50.0, "class_prior": "uniform"}})
    trainer = DPTrainer(cfg, peers, ledger_dir=None, generator=torch.Generator().manual_seed(1))
    for r in range(2):
        assert trainer.local_train(peers[1], epochs=1, round_index=r).ran
        assert trainer.mutual_train(peers[0], [p.model for p in peers], alpha=0.5, temperature=2.0, epochs=1,
                                    class_prior=None, round_index=r).ran
    gc.collect()
    kinds = (torch.optim.Optimizer, AbstractGradSampleModule, DPSGDSession)
    ours = {id(q) for p in peers for q in p.model.parameters()}

    def params_of(o: object) -> set[int]:
        if isinstance(o, torch.optim.Optimizer):
            return {id(q) for g in o.param_groups for q in g["params"]}
        if isinstance(o, AbstractGradSampleModule):
            return {id(q) for q in o.parameters()}
        return {id(q) for q in getattr(o, "params", [])}

    alive = [o for o in gc.get_objects() if isinstance(o, kinds) and params_of(o) & ours]
    assert alive == []  # between phases: no optimizer, no Opacus wrapper, no session
    for p in peers:
        assert all(q.grad is None for q in p.model.parameters())
        assert set(p.__dict__) == {f for f in PeerState.__dataclass_fields__}  # nothing else hangs off the state


# -- whole runs ----------------------------------------------------------------------------


def _ledgers(run: Path) -> list[object]:
    out = []
    for path in sorted((run / "ledgers").glob("*.json")):
        raw = json.loads(path.read_text())
        keep = ("round", "phase", "noise_multiplier", "sample_rate", "steps", "epsilon_after")
        out.append([{k: e[k] for k in keep} for e in raw["entries"]])
    return out


@pytest.mark.parametrize("private", [False, True])
def test_a_run_gives_the_same_metrics_and_ledgers_with_and_without_the_cache(tmp_path, private):
    runs = []
    for cache in (True, False):
        sections = {"federation": {"feature_cache": cache}}
        if private:
            sections["privacy"] = DP
        run_federation(config_with(BASE, **sections), tmp_path / f"run-{cache}", plot=False)
        runs.append(tmp_path / f"run-{cache}")
    with_cache, without = (timeless_metrics(r) for r in runs)
    assert with_cache == without  # exactly equal: features are computed with the model's own float32 ops
    assert any(e["phase"] == "mutual" for r in with_cache for e in r["phases"])
    if private:
        assert _ledgers(runs[0]) == _ledgers(runs[1]) != []  # the same mechanisms: accounting is unchanged


def test_the_global_test_features_are_shared_by_every_node_and_checkpoints_do_not_change(tmp_path):
    feds = [build_federation(config_with(BASE, federation={"feature_cache": c})) for c in (True, False)]
    on, off = feds
    assert len({id(n.test_inputs) for n in on.nodes}) == 1  # one cache of the global test set per federation
    assert on.nodes[0].test_inputs.x is on.nodes[1].x_test
    for fed in feds:
        fed.round_record(0)
    assert len(on.nodes[0].test_inputs.cached_keys) == 1 and off.nodes[0].test_inputs.cached_keys == ()
    assert on.directory.schemas.keys() == off.directory.schemas.keys()
    for i, s in on.directory.schemas.items():
        assert s == off.directory.schemas[i]  # the wire format: the same tensors, names and shapes
    for a, b in zip(on.nodes, off.nodes, strict=True):
        ca, cb = a.checkpoint_bytes(), b.checkpoint_bytes()  # the checkpoint format and content
        ta, tb = load_safetensors(ca), load_safetensors(cb)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
        ma, mb = (json.loads(safe_open_metadata(c)["secure_dfml"]) for c in (ca, cb))
        assert ma.pop("replay")["seen"] and mb.pop("replay")  # envelope nonces are random
        assert ma == mb
        assert schema_of(a.model.state_dict()) == on.directory.schemas[a.peer_id]


def test_feature_cache_is_a_validated_config_key():
    assert config_from_dict({}).federation.feature_cache is True
    cfg = config_from_dict({"federation": {"feature_cache": False}})
    assert cfg.federation.feature_cache is False
    assert "feature_cache = false" in dump_toml(cfg)
    with pytest.raises(ConfigError, match="feature_cache"):
        config_from_dict({"federation": {"feature_cache": "yes"}})


def test_every_registered_scatter_model_is_found_by_its_marker_not_its_name():
    found = sorted(n for n, spec in MODEL_REGISTRY.items() if spec.kind == "image" and fixed_front(model(n)) is not None)
    assert found == sorted(SCATTER)
