"""audit_model: the engine-facing entry point (fast, tiny models on synthetic data)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from secure_dfml import audit
from secure_dfml.errors import AuditError


def _data(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    x = rng.normal(size=(n, 6)).astype(np.float32)
    y = (x[:, 0] + 0.5 * rng.normal(size=n) > 0).astype(np.int64)
    return x, y


def _factory(rng: np.random.Generator) -> torch.nn.Module:
    return audit.reinit_parameters(torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.ReLU(),
                                                       torch.nn.Linear(32, 2)), rng)


_train = audit.make_trainer(epochs=5, lr=1e-2, batch_size=32)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models train fastest on one thread (and do not fight other test workers)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup() -> dict[str, object]:
    rng = np.random.default_rng(0)
    xm, ym = _data(rng, 120)
    xn, yn = _data(rng, 120)
    xp, yp = _data(rng, 300)
    target = _train(_factory(rng), xm, ym, rng)
    return {"target": target, "xm": xm, "ym": ym, "xn": xn, "yn": yn, "xp": xp, "yp": yp}


def _run(s: dict[str, object], **kw: object) -> audit.AuditResult:
    args = dict(x_members=s["xm"], y_members=s["ym"], x_nonmembers=s["xn"], y_nonmembers=s["yn"],
                pool_x=s["xp"], pool_y=s["yp"], model_factory=_factory, train_fn=_train, n_bootstrap=20)
    args.update(kw)
    return audit.audit_model(s["target"], **args)  # type: ignore[arg-type]


def test_offline_only_trains_offline_models_and_is_reproducible(setup: dict[str, object]) -> None:
    a = _run(setup, attacks=("loss", "population", "lira_offline", "rmia_offline"), n_reference=2,
             rng=np.random.default_rng(3))
    b = _run(setup, attacks=("loss", "population", "lira_offline", "rmia_offline"), n_reference=2,
             rng=np.random.default_rng(3))
    assert not a.reference_online and a.n_reference == 2 and a.n_population == 100
    for name in a.results:
        np.testing.assert_array_equal(a.results[name].scores, b.results[name].scores)
        assert 0.0 <= a.results[name].metrics.auc.value <= 1.0
    assert a.results["rmia_offline"].details["a_tuned"] is True
    json.dumps(a.to_dict(include_scores=True))  # JSON-serialisable as is


def test_reuse_reference_models_across_calls(setup: dict[str, object], tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    pop = (setup["xp"][:60], setup["yp"][:60])  # type: ignore[index]
    ch_x = np.concatenate([setup["xm"], setup["xn"], pop[0]])  # type: ignore[list-item]
    ch_y = np.concatenate([setup["ym"], setup["yn"], pop[1]])  # type: ignore[list-item]
    ref = audit.train_reference_models(model_factory=_factory, train_fn=_train, pool_x=setup["xp"][60:],
                                       pool_y=setup["yp"][60:], k=4, rng=rng, challenge_x=ch_x, challenge_y=ch_y)
    res = _run(setup, attacks=("lira_online", "rmia_online", "lira_offline"), reference=ref.subset(2),
               population=pop, pool_x=setup["xp"][60:], pool_y=setup["yp"][60:], rng=rng)
    assert res.reference_online and res.n_reference == 2
    path = audit.write_html_report(tmp_path / "r.html", {"peer-0": res})
    assert path.stat().st_size > 1000


def test_errors_are_typed_and_helpful(setup: dict[str, object]) -> None:
    rng = np.random.default_rng(5)
    with pytest.raises(AuditError, match="available"):
        _run(setup, attacks=("telepathy",), rng=rng)
    with pytest.raises(AuditError, match="model_factory"):
        _run(setup, attacks=("lira_online",), model_factory=None, rng=rng)
    with pytest.raises(AuditError, match="at least 2"):
        _run(setup, attacks=("lira_online",), n_reference=1, rng=rng)
    ref = audit.train_reference_models(model_factory=_factory, train_fn=_train, pool_x=setup["xp"],
                                       pool_y=setup["yp"], k=1, rng=rng)
    with pytest.raises(AuditError, match="population"):
        _run(setup, attacks=("rmia_offline",), reference=ref, rng=rng)
    with pytest.raises(AuditError, match="online"):
        _run(setup, attacks=("rmia_online",), reference=ref, population=(setup["xp"][:10], setup["yp"][:10]),
             rng=rng)
