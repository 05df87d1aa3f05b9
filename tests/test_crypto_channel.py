"""Channels end to end: the codec behind the channel, the plaintext channel,
and build_channel / build_secure_averager from config."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secure_dfml.config import CryptoConfig
from secure_dfml.crypto import (
    PASSPHRASE_ENV,
    InsecureChannelError,
    KeyMismatchError,
    KeyFileError,
    NaClChannel,
    PlainChannel,
    build_channel,
    build_secure_averager,
    decode_state,
    encode_state,
    generate_keys,
    open_state,
    schema_of,
    seal_state,
    write_keys,
)
from secure_dfml.errors import CodecError
from secure_dfml.crypto import SecureAverager
from secure_dfml.protocol._interfaces import Channel

FED = "fed-chan"
CTX = {"sender": 0, "recipient": 1, "round_index": 2, "kind": "model"}
SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def keyring():
    return generate_keys(3, FED)


@pytest.fixture()
def channel(keyring):
    return NaClChannel(keyring=keyring)


def small_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(4, 1, 3, 3, generator=g),
        "conv.bias": torch.randn(4, generator=g),
        "fc.weight": torch.randn(10, 16, generator=g),
    }


def test_channels_satisfy_the_protocol(channel):
    assert isinstance(channel, Channel) and channel.secure and channel.name == "nacl"
    plain = PlainChannel(allow_insecure=True)
    assert isinstance(plain, Channel) and not plain.secure and plain.name == "none"


# ---------------------------------------------------------------------------
# Codec through the channel


def test_state_round_trip(channel):
    state = small_state()
    env = seal_state(channel, state, **CTX)
    out = open_state(channel, env, schema_of(state), **CTX)
    assert all(torch.equal(out[k], state[k]) for k in state)


def _bad_states() -> dict[str, dict[str, torch.Tensor]]:
    good = small_state()
    nan = dict(good, **{"fc.weight": good["fc.weight"].clone()})
    nan["fc.weight"][0, 0] = math.nan
    inf = dict(good, **{"conv.bias": good["conv.bias"].clone()})
    inf["conv.bias"][1] = -math.inf
    return {
        "missing name": {k: v for k, v in good.items() if k != "conv.bias"},
        "extra name": dict(good, extra=torch.zeros(1)),
        "renamed": {("fc.w" if k == "fc.weight" else k): v for k, v in good.items()},
        "wrong shape": dict(good, **{"fc.weight": torch.zeros(16, 10)}),
        "wrong dtype": dict(good, **{"fc.weight": good["fc.weight"].double()}),
        "nan": nan,
        "inf": inf,
    }


@pytest.mark.parametrize("case", list(_bad_states()))
def test_codec_rejects_mismatching_states_without_state_change(channel, case):
    schema = schema_of(small_state())
    env = seal_state(channel, _bad_states()[case], **CTX)
    before = channel.replay_state()
    with pytest.raises(CodecError):
        open_state(channel, env, schema, **CTX)
    assert channel.replay_state() == before  # the nonce was not consumed
    # a valid model is still accepted afterwards
    ok = seal_state(channel, small_state(1), **CTX)
    assert set(open_state(channel, ok, schema, **CTX)) == set(schema)


@SETTINGS
@given(payload=st.binary(max_size=2000))
def test_malformed_payload_is_a_codec_error(channel, payload):
    env = channel.seal(payload, **CTX)
    with pytest.raises(CodecError):
        open_state(channel, env, schema_of(small_state()), **CTX)


@SETTINGS
@given(data=st.data())
def test_corrupted_safetensors_never_crash(channel, data):
    raw = bytearray(encode_state(small_state()))
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    try:
        decode_state(bytes(channel.open(channel.seal(bytes(raw), **CTX), **CTX)), schema_of(small_state()))
    except CodecError:
        pass


# ---------------------------------------------------------------------------
# Plaintext channel


def test_plain_channel_needs_explicit_flag(caplog):
    with pytest.raises(InsecureChannelError):
        PlainChannel()
    with pytest.raises(InsecureChannelError):
        PlainChannel(allow_insecure="yes")  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING):
        ch = PlainChannel(allow_insecure=True)
    assert "INSECURE" in caplog.text
    assert ch.open(ch.seal(b"abc", **CTX), **CTX) == b"abc"


# ---------------------------------------------------------------------------
# build_channel / build_secure_averager


def test_build_channel_ephemeral():
    ch, desc = build_channel(CryptoConfig(), federation_id=FED, num_peers=4)
    assert isinstance(ch, NaClChannel) and len(ch.directory) == 4 and ch.federation_id == FED
    assert "ephemeral" in desc and "not persisted" in desc
    assert ch.open(ch.seal(b"x", **CTX), **CTX) == b"x"


def test_build_channel_padding_flag():
    ch, desc = build_channel(CryptoConfig(pad_messages=True), federation_id=FED, num_peers=2)
    assert ch.pad_messages and "padded" in desc
    assert len(ch.seal(b"x", **CTX)) == ch.envelope_size(1) > 4096


def test_build_channel_insecure(caplog):
    with caplog.at_level(logging.WARNING):
        ch, desc = build_channel(CryptoConfig(channel="none", allow_insecure=True), federation_id=FED, num_peers=2)
    assert isinstance(ch, PlainChannel) and "INSECURE" in desc and "INSECURE" in caplog.text


def test_build_channel_from_keys_dir(tmp_path):
    write_keys(tmp_path / "keys", generate_keys(5, FED))
    ch, desc = build_channel(CryptoConfig(keys_dir=str(tmp_path / "keys")), federation_id=FED, num_peers=4)
    assert isinstance(ch, NaClChannel) and "keys from" in desc
    assert ch.open(ch.seal(b"x", **CTX), **CTX) == b"x"
    with pytest.raises(KeyMismatchError):
        build_channel(CryptoConfig(keys_dir=str(tmp_path / "keys")), federation_id="other", num_peers=4)
    with pytest.raises(KeyMismatchError):  # the directory covers 5 peers, not 6
        build_channel(CryptoConfig(keys_dir=str(tmp_path / "keys")), federation_id=FED, num_peers=6)
    with pytest.raises(KeyFileError):
        build_channel(CryptoConfig(keys_dir=str(tmp_path / "nowhere")), federation_id=FED, num_peers=2)


def test_build_channel_sealed_keys_use_env_passphrase(tmp_path, monkeypatch):
    write_keys(tmp_path, generate_keys(2, FED), passphrase="s3cret", kdf="interactive")
    monkeypatch.setenv(PASSPHRASE_ENV, "s3cret")
    ch, _ = build_channel(CryptoConfig(keys_dir=str(tmp_path)), federation_id=FED, num_peers=2)
    assert ch.open(ch.seal(b"x", **CTX), **CTX) == b"x"


def test_build_secure_averager():
    assert build_secure_averager(CryptoConfig()) is None
    avg = build_secure_averager(CryptoConfig(secure_aggregation="ckks"))
    assert isinstance(avg, SecureAverager) and avg.name == "ckks" and avg.min_contributors() == 2
