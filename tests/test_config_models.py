"""Config validation and the model zoo."""

from __future__ import annotations

import tomllib

import pytest
import torch
from opacus.validators import ModuleValidator

from secure_dfml.config import RunConfig, config_from_dict, dump_toml, load_config
from secure_dfml.errors import ConfigError, ModelError, SecureDFMLError
from secure_dfml.models import MODEL_REGISTRY, available_models, build_model, resolve_architectures
from secure_dfml.models._zoo import morlet_bank


def test_default_config_round_trips_through_toml():
    cfg = RunConfig()
    assert config_from_dict(tomllib.loads(dump_toml(cfg))) == cfg


@pytest.mark.parametrize(
    "raw, needle",
    [
        ({"federation": {"peerz": 3}}, "unknown key(s) 'peerz' in [federation]"),
        ({"dfml": {"alpha_max": 2}}, "dfml.alpha_max"),
        ({"federation": {"algorithm": "fedprox"}}, "one of 'dfml'"),
        ({"federation": {"participants": 20}}, "between 2 and peers"),
        ({"data": {"partition": "random"}}, "'iid', 'dirichlet', 'shards'"),
        ({"dfml": {"temperature": 0}}, "dfml.temperature"),
        ({"federation": {"rounds": "ten"}}, "expected an integer"),
        ({"federation": {"rounds": 10**12}}, "federation.rounds = 1000000000000 is invalid: expected an integer between 1 and 100000"),
        ({"crypto": {"channel": "none"}}, "allow_insecure"),
        ({"privacy": {"epsilon": -1}}, "privacy.epsilon"),
        ({"privacy": {"peers": {"x": {"epsilon": 1.0}}}}, "peer ids as integers"),
        ({"privacy": {"grad_sample_mode": "hooks"}}, "privacy.clipping = 'per-model' is invalid: expected \"joint\""),
        ({"privacy": {"plan_on": "luck"}}, "'schedule', 'expected'"),
        ({"surprise": {}}, "unknown key(s) 'surprise'"),
    ],
)
def test_config_errors_name_field_and_allowed_values(raw, needle):
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    assert needle in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, SecureDFMLError)


def test_load_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[federation\npeers = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    ok = tmp_path / "ok.toml"
    ok.write_text('[federation]\npeers = 4\nparticipants = 3\n[privacy]\nenabled = true\n[privacy.peers.2]\nepsilon = 2.0\n')
    cfg = load_config(ok)
    assert cfg.federation.peers == 4 and cfg.privacy.peers["2"].epsilon == 2.0


@pytest.mark.parametrize(
    "privacy",
    ['[privacy]\nepsilon = 2\n', '[privacy.peers.2]\nepsilon = 2.0\n', '[privacy]\nenabled = false\nsecure_mode = true\n'],
)
def test_privacy_keys_without_privacy_enabled_are_refused(tmp_path, privacy):
    """A budget that silently does nothing is worse than an error: the run would be non-private."""
    path = tmp_path / "c.toml"
    path.write_text("[federation]\npeers = 4\nparticipants = 3\n" + privacy)
    with pytest.raises(ConfigError, match=r"privacy.enabled is not true.*enabled = true"):
        load_config(path)


def test_a_non_private_config_round_trips_without_privacy_settings():
    cfg = config_from_dict({"privacy": {"enabled": True, "epsilon": 2.0}}).replace(privacy={"enabled": False})
    text = dump_toml(cfg)
    assert "[privacy]\nenabled = false\n\n" in text
    assert config_from_dict(tomllib.loads(text)).privacy.enabled is False


def test_configs_are_frozen():
    cfg = RunConfig()
    with pytest.raises(AttributeError):
        cfg.federation.peers = 3  # type: ignore[misc]


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_image_zoo_builds_and_is_dp_compatible(shape):
    sizes = set()
    for name in available_models("image"):
        m = build_model(name, input_shape=shape, num_classes=10, kind="image", generator=torch.Generator().manual_seed(0))
        assert m(torch.zeros(3, *shape)).shape == (3, 10)
        assert ModuleValidator.validate(m, strict=False) == []
        sizes.add(sum(p.numel() for p in m.parameters()))
    assert len(sizes) == len(available_models("image")) >= 4


def test_tabular_zoo():
    names = available_models("tabular")
    assert len(names) >= 2
    for name in names:
        m = build_model(name, input_shape=(11,), num_classes=2, kind="tabular", generator=torch.Generator().manual_seed(0))
        assert m(torch.zeros(4, 11)).shape == (4, 2)
        assert ModuleValidator.validate(m, strict=False) == []


def test_model_init_uses_only_the_given_generator():
    a = build_model("cnn-small", input_shape=(1, 8, 8), num_classes=10, kind="image", generator=torch.Generator().manual_seed(5))
    torch.manual_seed(123)  # global state must not matter
    b = build_model("cnn-small", input_shape=(1, 8, 8), num_classes=10, kind="image", generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_architecture_errors():
    with pytest.raises(ModelError, match="unknown architecture 'vgg'"):
        resolve_architectures(3, kind="image", mix=("vgg",))
    with pytest.raises(ModelError, match="tabular"):
        resolve_architectures(3, kind="image", mix=("tab-mlp-small",))
    with pytest.raises(ModelError, match="one per peer"):
        resolve_architectures(3, kind="image", per_peer=("mlp",))
    assert resolve_architectures(5, kind="image", mix=("mlp", "cnn-small")) == ["mlp", "cnn-small"] * 2 + ["mlp"]
    assert set(MODEL_REGISTRY) >= {"mlp", "cnn-small", "cnn-wide", "resnet-gn"}


def test_built_in_default_is_private_and_encrypted():
    from secure_dfml.config import default_config

    cfg = default_config()
    assert cfg.privacy.enabled and cfg.privacy.epsilon == 8.0 and cfg.privacy.delta == 1e-5
    assert cfg.crypto.channel == "nacl" and not cfg.crypto.allow_insecure
    assert cfg.federation.peers == 10 and len(set(cfg.models.mix or ("cnn-small", "mlp", "resnet-gn", "cnn-wide"))) >= 3


def test_readme_config_example_is_valid():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    start = text.index("```toml\n[federation]") + len("```toml")  # the Configuration section's full example
    block = text[start : text.index("```", start)]
    cfg = config_from_dict(tomllib.loads(block))
    assert cfg.privacy.enabled and cfg.privacy.peers["3"].epsilon == 2.0


def test_morlet_bank_is_zero_mean_normalised_and_oriented():
    bank = morlet_bank(2, 8, 11)
    assert bank.shape == (16, 2, 11, 11)
    complex_bank = torch.complex(bank[:, 0].double(), bank[:, 1].double())
    assert complex_bank.sum((1, 2)).abs().max() < 1e-6  # band-pass: no response to a constant image
    torch.testing.assert_close(complex_bank.abs().sum((1, 2)), torch.ones(16, dtype=torch.float64), rtol=1e-4, atol=0)
    # vertical stripes at the finest wavelets' frequency excite theta = 0 far more than theta = pi/2
    stripes = torch.cos(0.75 * torch.pi * torch.arange(14.0)).expand(1, 1, 14, 14)
    z = torch.nn.functional.conv2d(stripes, bank.reshape(-1, 1, 11, 11)).unflatten(1, (16, 2))
    energy = (z**2).sum((2, 3, 4))[0]
    assert energy[0] > 10 * energy[4] and energy[0] == energy[:8].max()


@pytest.mark.parametrize("name", ["scatter-linear", "scatter-cnn", "scatter-mlp"])
def test_scattering_models_train_only_their_head_and_send_no_filters(name):
    m = build_model(name, input_shape=(1, 14, 14), num_classes=10, kind="image", generator=torch.Generator().manual_seed(0))
    # the fixed wavelets are neither parameters nor in the state dict (nothing to send, clip or load)
    assert not any("scatter" in k for k in m.state_dict())
    assert all(not n.startswith("scatter") for n, _ in m.named_parameters())
    x = torch.randn(5, 1, 14, 14, generator=torch.Generator().manual_seed(2))
    other = build_model(name, input_shape=(1, 14, 14), num_classes=10, kind="image", generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(m.scatter(x), other.scatter(x))  # data- and seed-independent features
    # features are normalised per sample and channel, so a contrast scale changes nothing (up to GroupNorm's eps)
    torch.testing.assert_close(m.scatter(3.0 * x), m.scatter(x), rtol=1e-2, atol=1e-2)
