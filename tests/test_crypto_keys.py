"""Keys: generation, files (0600, atomic), passphrase sealing, directory
checks, and the `keys` CLI."""

from __future__ import annotations

import json
import logging
import os
import stat

import pytest
from typer.testing import CliRunner

from secure_dfml.cli.keys import app
from secure_dfml.crypto import (
    DIRECTORY_FILE,
    KeyFileError,
    KeyMismatchError,
    KeyRing,
    PassphraseRequiredError,
    PeerDirectory,
    UnknownPeerError,
    WrongPassphraseError,
    generate_keys,
    load_directory,
    load_keys,
    private_key_path,
    write_keys,
)

FED = "fed-keys"
posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def same_keys(a: KeyRing, b: KeyRing) -> bool:
    return sorted(a.identities) == sorted(b.identities) and all(
        bytes(a.identities[i].signing_key) == bytes(b.identities[i].signing_key)
        and bytes(a.identities[i].box_key) == bytes(b.identities[i].box_key)
        for i in a.identities
    )


def test_generate_keys_are_distinct_and_consistent():
    kr = generate_keys(5, FED)
    assert kr.federation_id == FED and kr.directory.peer_ids == [0, 1, 2, 3, 4]
    assert len({i.fingerprint for i in kr.identities.values()}) == 5
    assert kr.directory.lookup(3).fingerprint == kr.identity(3).fingerprint
    with pytest.raises(UnknownPeerError):
        kr.directory.lookup(7)
    with pytest.raises(KeyFileError):
        generate_keys(0, FED)


def test_repr_does_not_leak_private_keys():
    ident = generate_keys(1, FED).identity(0)
    text = repr(ident)
    assert bytes(ident.signing_key).hex() not in text and bytes(ident.box_key).hex() not in text
    assert "fingerprint" in text


@posix_only
def test_write_load_round_trip_with_0600(tmp_path):
    kr = generate_keys(3, FED)
    paths = write_keys(tmp_path / "k", kr)
    assert paths[0].name == DIRECTORY_FILE and len(paths) == 4
    for pid in range(3):
        assert mode(private_key_path(tmp_path / "k", pid)) == 0o600
    assert mode(tmp_path / "k" / DIRECTORY_FILE) == 0o644
    assert not list((tmp_path / "k").glob(".*tmp"))  # no temporary files left
    loaded = load_keys(tmp_path / "k")
    assert same_keys(kr, loaded) and loaded.warnings == ()
    assert load_directory(tmp_path / "k").to_json() == kr.directory.to_json()


@posix_only
def test_0600_even_with_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        write_keys(tmp_path, generate_keys(1, FED))
    finally:
        os.umask(old)
    assert mode(private_key_path(tmp_path, 0)) == 0o600


def test_passphrase_round_trip_and_errors(tmp_path):
    kr = generate_keys(2, FED)
    write_keys(tmp_path, kr, passphrase="correct horse", kdf="interactive")
    raw = private_key_path(tmp_path, 0).read_text()
    assert bytes(kr.identity(0).signing_key).hex() not in raw and '"sealed"' in raw
    assert same_keys(kr, load_keys(tmp_path, passphrase="correct horse"))
    with pytest.raises(WrongPassphraseError):
        load_keys(tmp_path, passphrase="wrong horse")
    with pytest.raises(PassphraseRequiredError):
        load_keys(tmp_path)
    with pytest.raises(KeyFileError):
        write_keys(tmp_path / "x", kr, passphrase="")


def test_tampered_sealed_file_is_refused(tmp_path):
    write_keys(tmp_path, generate_keys(1, FED), passphrase="pw", kdf="interactive")
    p = private_key_path(tmp_path, 0)
    doc = json.loads(p.read_text())
    sealed = bytearray(bytes.fromhex(doc["sealed"]))
    sealed[-1] ^= 1
    doc["sealed"] = sealed.hex()
    p.write_text(json.dumps(doc))
    with pytest.raises(WrongPassphraseError):
        load_keys(tmp_path, passphrase="pw")
    doc["kdf"]["memlimit"] = 2**40  # a crafted file must not make the loader allocate 1 TiB
    p.write_text(json.dumps(doc))
    with pytest.raises(KeyFileError):
        load_keys(tmp_path, passphrase="pw")


def test_missing_files_are_clear(tmp_path):
    with pytest.raises(KeyFileError, match="does not exist"):
        load_keys(tmp_path / "absent")
    with pytest.raises(KeyFileError, match="keys init"):
        load_keys(tmp_path)
    write_keys(tmp_path, generate_keys(3, FED))
    private_key_path(tmp_path, 1).unlink()
    assert sorted(load_keys(tmp_path).identities) == [0, 2]  # a peer loads what it has
    with pytest.raises(KeyFileError, match="peer-1.key"):
        load_keys(tmp_path, peers=[0, 1])
    with pytest.raises(KeyMismatchError):
        load_keys(tmp_path, peers=[0, 9])


@posix_only
def test_exposed_private_keys_are_refused_unless_the_user_opts_in(tmp_path, caplog):
    write_keys(tmp_path, generate_keys(1, FED))
    os.chmod(private_key_path(tmp_path, 0), 0o644)
    with pytest.raises(KeyFileError, match=r"chmod 600.*allow_exposed_keys"):
        load_keys(tmp_path)
    with caplog.at_level(logging.WARNING):
        kr = load_keys(tmp_path, allow_exposed_keys=True)
    assert kr.warnings and "chmod 600" in kr.warnings[0] and "chmod 600" in caplog.text


def test_overwrite_is_refused(tmp_path):
    write_keys(tmp_path, generate_keys(1, FED))
    with pytest.raises(KeyFileError, match="already exists"):
        write_keys(tmp_path, generate_keys(1, FED))
    kr = generate_keys(1, FED)
    write_keys(tmp_path, kr, overwrite=True)
    assert same_keys(kr, load_keys(tmp_path))


def test_directory_tampering_is_detected(tmp_path):
    write_keys(tmp_path, generate_keys(2, FED))
    d = tmp_path / DIRECTORY_FILE
    doc = json.loads(d.read_text())
    doc["peers"]["0"]["verify_key"] = doc["peers"]["1"]["verify_key"]
    d.write_text(json.dumps(doc))
    with pytest.raises(KeyFileError, match="fingerprint"):
        load_keys(tmp_path)
    for bad in ("not json", json.dumps({"format": "x"}), json.dumps({**doc, "peers": {"a": {}}})):
        d.write_text(bad)
        with pytest.raises(KeyFileError):
            load_directory(tmp_path)


def test_private_key_must_match_directory(tmp_path):
    write_keys(tmp_path, generate_keys(2, FED))
    # swap in another federation's key file for peer 1
    other = tmp_path / "other"
    write_keys(other, generate_keys(2, FED))
    private_key_path(tmp_path, 1).write_bytes(private_key_path(other, 1).read_bytes())
    with pytest.raises(KeyMismatchError, match="does not match"):
        load_keys(tmp_path)


def test_directory_rejects_duplicate_keys():
    kr = generate_keys(2, FED)
    p0 = kr.directory.peers[0]
    with pytest.raises(KeyFileError):
        PeerDirectory(federation_id=FED, peers={0: p0, 1: type(p0)(1, p0.verify_key, p0.box_public_key)})


# ---------------------------------------------------------------------------
# CLI


def test_cli_init_and_show(tmp_path):
    runner = CliRunner()
    out = tmp_path / "keys"
    res = runner.invoke(app, ["init", "--peers", "3", "--out", str(out), "--federation", FED])
    assert res.exit_code == 0, res.output
    assert "0600" in res.output
    res = runner.invoke(app, ["show", str(out), "--format", "json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["federation_id"] == FED and [p["peer"] for p in doc["peers"]] == [0, 1, 2]
    assert all(p["private_key"] == "present" for p in doc["peers"])
    kr = load_keys(out)
    assert doc["peers"][2]["fingerprint"] == kr.identity(2).fingerprint
    res = runner.invoke(app, ["show", str(out)])
    assert res.exit_code == 0 and kr.identity(0).fingerprint in res.output
    res = runner.invoke(app, ["init", "--peers", "3", "--out", str(out)])
    assert res.exit_code != 0 and "already exists" in res.output


def test_cli_passphrase_file(tmp_path):
    pw = tmp_path / "pw.txt"
    pw.write_text("long passphrase\n")
    runner = CliRunner()
    res = runner.invoke(app, ["init", "--peers", "1", "--out", str(tmp_path / "k"), "--passphrase-file", str(pw), "--kdf", "interactive"])
    assert res.exit_code == 0, res.output
    assert len(load_keys(tmp_path / "k", passphrase="long passphrase").identities) == 1
    res = runner.invoke(app, ["show", str(tmp_path / "nothing")])
    assert res.exit_code != 0 and "keys init" in res.output
