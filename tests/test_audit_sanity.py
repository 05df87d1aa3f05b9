"""End-to-end sanity on real data (sklearn digits).

* A non-private MLP overfit on 300 digits leaks: LiRA and RMIA find membership
  with an AUC confidence interval that excludes 0.5.
* A DP-SGD model (opacus, epsilon = 1) does not: every attack respects
  TPR <= e^eps * FPR + delta within its intervals, and the empirical lower
  bound does not exceed the ledger epsilon.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from secure_dfml import audit
from secure_dfml.errors import AuditError

N_MEMBERS = 300


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Small models train faster on one thread (and do not fight other test workers)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits() -> dict[str, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    y = y.astype(np.int64)
    perm = np.random.default_rng(2024).permutation(len(x))
    mem, non, pool = perm[:N_MEMBERS], perm[N_MEMBERS : 2 * N_MEMBERS], perm[2 * N_MEMBERS :]
    return {"xm": x[mem], "ym": y[mem], "xn": x[non], "yn": y[non], "xp": x[pool], "yp": y[pool]}


def _mlp(rng: np.random.Generator) -> torch.nn.Module:
    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    return audit.reinit_parameters(net, rng)


def test_membership_design_is_balanced() -> None:
    rng = np.random.default_rng(0)
    mask = audit.membership_design(8, 101, rng)
    assert mask.shape == (8, 101)
    assert np.all(mask.sum(0) == 4)  # complementary pairs
    assert np.all(mask[0] == ~mask[1])
    odd = audit.membership_design(3, 50, rng)
    assert np.all(odd[:2].sum(0) == 1)


def test_reference_training_is_reproducible_and_generic() -> None:
    calls: list[int] = []

    def factory(rng: np.random.Generator) -> torch.nn.Module:
        return audit.reinit_parameters(torch.nn.Linear(4, 3), rng)

    def train_fn(model: torch.nn.Module, x: Any, y: Any, rng: np.random.Generator) -> torch.nn.Module:
        calls.append(len(y))
        return model

    xp = np.zeros((40, 4), np.float32)
    yp = np.arange(40) % 3
    xc = np.ones((10, 4), np.float32)
    yc = np.arange(10) % 3
    a = audit.train_reference_models(model_factory=factory, train_fn=train_fn, pool_x=xp, pool_y=yp, k=4,
                                     rng=np.random.default_rng(5), challenge_x=xc, challenge_y=yc, train_size=8)
    b = audit.train_reference_models(model_factory=factory, train_fn=train_fn, pool_x=xp, pool_y=yp, k=4,
                                     rng=np.random.default_rng(5), challenge_x=xc, challenge_y=yc, train_size=8)
    assert a.online and a.k == 4 and calls == [8] * 8  # 5 challenge IN + 3 pool samples each
    assert np.array_equal(a.challenge_masks, b.challenge_masks) and np.array_equal(a.pool_masks, b.pool_masks)
    for ma, mb in zip(a.models, b.models):
        assert torch.equal(ma.weight, mb.weight)
    off = audit.train_reference_models(model_factory=factory, train_fn=train_fn, pool_x=xp, pool_y=yp, k=2,
                                       rng=np.random.default_rng(1))
    assert not off.online and off.pool_masks.sum(1).tolist() == [20, 20]
    assert off.subset(1).k == 1
    with pytest.raises(AuditError):
        audit.train_reference_models(model_factory=factory, train_fn=train_fn, pool_x=xp, pool_y=yp, k=1,
                                     rng=np.random.default_rng(1), train_size=41)


@pytest.mark.slow
def test_overfit_model_leaks(digits: dict[str, np.ndarray]) -> None:
    rng = np.random.default_rng(7)
    train = audit.make_trainer(epochs=60, lr=3e-3, batch_size=64)
    target = train(_mlp(rng), digits["xm"], digits["ym"], rng)
    acc_train = (target(torch.from_numpy(digits["xm"])).argmax(1).numpy() == digits["ym"]).mean()
    assert acc_train == 1.0  # memorised
    progress: list[tuple[int, int]] = []
    res = audit.audit_model(
        target, x_members=digits["xm"], y_members=digits["ym"], x_nonmembers=digits["xn"],
        y_nonmembers=digits["yn"], pool_x=digits["xp"], pool_y=digits["yp"], model_factory=_mlp, train_fn=train,
        attacks=("loss", "population", "lira_online", "rmia_online", "lira_offline", "rmia_offline"),
        n_reference=8, n_population=300, rng=rng, n_bootstrap=300,
        progress=lambda done, total: progress.append((done, total)),
    )
    assert progress[-1] == (8, 8) and res.reference_online and res.n_reference == 8
    for name in ("lira_online", "rmia_online", "lira_offline", "rmia_offline"):
        est = res.results[name].metrics.auc
        assert est.ci_low > 0.5, (name, est)
    # 300 non-members cannot support an FPR of 0.1%
    assert res.results["rmia_online"].metrics.tpr_at_fpr[0.001].value is None
    assert res.results["rmia_offline"].details["a_tuned"] is True
    d = res.to_dict()
    assert set(d["attacks"]) == set(res.results)


def _linear(rng: np.random.Generator) -> torch.nn.Module:
    return audit.reinit_parameters(torch.nn.Linear(64, 10), rng)


def _dp_trainer(epsilon: float, delta: float, epochs: int) -> audit.TrainFn:
    from opacus import PrivacyEngine

    def train(model: torch.nn.Module, x: Any, y: Any, rng: np.random.Generator) -> torch.nn.Module:
        ds = torch.utils.data.TensorDataset(torch.as_tensor(x), torch.as_tensor(y))
        loader = torch.utils.data.DataLoader(ds, batch_size=100, generator=audit.torch_generator(rng))
        opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
        with warnings.catch_warnings():  # seeded research mode and accountant chatter are expected here
            warnings.simplefilter("ignore")
            engine = PrivacyEngine(accountant="prv")
            gsm, opt, loader = engine.make_private_with_epsilon(
                module=model, optimizer=opt, data_loader=loader, target_epsilon=epsilon, target_delta=delta,
                epochs=epochs, max_grad_norm=1.0, noise_generator=audit.torch_generator(rng),
            )
            for _ in range(epochs):
                for xb, yb in loader:
                    if len(yb) == 0:
                        continue
                    opt.zero_grad()
                    torch.nn.functional.cross_entropy(gsm(xb), yb).backward()
                    opt.step()
            spent = engine.get_epsilon(delta)
        assert spent <= epsilon * 1.01
        inner = gsm._module
        inner.eval()
        return inner

    return train


@pytest.mark.slow
def test_dp_model_respects_its_epsilon(digits: dict[str, np.ndarray]) -> None:
    eps, delta = 1.0, 1e-5
    rng = np.random.default_rng(11)
    train = _dp_trainer(eps, delta, epochs=15)  # noise multiplier ~ 8.7
    target = train(_linear(rng), digits["xm"], digits["ym"], rng)
    acc = (target(torch.from_numpy(digits["xn"])).argmax(1).numpy() == digits["yn"]).mean()
    assert acc > 0.3  # it learned something (chance: 0.1) despite the noise of eps = 1 on 300 samples
    res = audit.audit_model(
        target, x_members=digits["xm"], y_members=digits["ym"], x_nonmembers=digits["xn"],
        y_nonmembers=digits["yn"], pool_x=digits["xp"], pool_y=digits["yp"], model_factory=_linear, train_fn=train,
        attacks=("loss", "lira_online", "rmia_online"), n_reference=4, n_population=300, rng=rng, n_bootstrap=300,
    )
    for name, r in res.results.items():
        assert audit.dp_consistency_violations(r.metrics, eps, delta) == [], name
        for level, est in r.metrics.tpr_at_fpr.items():
            if est.value is not None:
                assert est.ci_low <= math.exp(eps) * level + delta
        lb = audit.epsilon_lower_bound_from_scores(r.scores, r.labels, rng=rng, delta=delta)
        assert not audit.compare_with_ledger(lb.epsilon_lower_bound, eps).failed, (name, lb)
