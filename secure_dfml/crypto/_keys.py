"""Peer identities: Ed25519 signing keys, X25519 box keys, the public peer
directory, and private key files (mode 0600, optionally passphrase-sealed).

On disk (``secure-dfml keys init --peers N --out keys/``)::

    keys/directory.json   public: federation id, per peer the hex public keys
                          and a fingerprint (share it with every peer)
    keys/peer-<id>.key    private, mode 0600: one peer's signing seed and box
                          secret key, in clear or sealed with a passphrase
                          (argon2id KDF + XSalsa20-Poly1305 SecretBox)

Every file is written to a temporary file in the same folder and atomically
renamed, so a crash never leaves a half-written key behind.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import nacl.encoding
import nacl.exceptions
import nacl.hash
import nacl.pwhash
import nacl.secret
import nacl.utils
from nacl.public import PrivateKey, PublicKey
from nacl.signing import SigningKey, VerifyKey

from secure_dfml.crypto._errors import (
    KeyFileError,
    KeyMismatchError,
    MissingKeyError,
    PassphraseRequiredError,
    UnknownPeerError,
    WrongPassphraseError,
)

__all__ = [
    "DIRECTORY_FILE",
    "KdfStrength",
    "KeyRing",
    "PeerDirectory",
    "PeerIdentity",
    "PeerPublicKeys",
    "fingerprint",
    "generate_keys",
    "load_directory",
    "load_keys",
    "private_key_path",
    "write_keys",
]

logger = logging.getLogger(__name__)

DIRECTORY_FILE = "directory.json"
_DIRECTORY_FORMAT = "secure-dfml/peer-directory"
_PRIVATE_FORMAT = "secure-dfml/private-key"
_FORMAT_VERSION = 1
_FP_PERSON = b"sdfml-fp-v1"
_MAX_FILE_BYTES = 16 * 1024 * 1024  # a directory of ~50k peers; refuse anything larger

KdfStrength = Literal["interactive", "moderate", "sensitive"]
_KDF_LIMITS: dict[str, tuple[int, int]] = {
    "interactive": (nacl.pwhash.argon2id.OPSLIMIT_INTERACTIVE, nacl.pwhash.argon2id.MEMLIMIT_INTERACTIVE),
    "moderate": (nacl.pwhash.argon2id.OPSLIMIT_MODERATE, nacl.pwhash.argon2id.MEMLIMIT_MODERATE),
    "sensitive": (nacl.pwhash.argon2id.OPSLIMIT_SENSITIVE, nacl.pwhash.argon2id.MEMLIMIT_SENSITIVE),
}
# Bounds accepted when *reading* a sealed file, so a crafted file cannot make
# the loader allocate unbounded memory or spin forever.
_MAX_OPSLIMIT = 64
_MAX_MEMLIMIT = 4 * 1024 * 1024 * 1024


def fingerprint(verify_key: bytes, box_public_key: bytes) -> str:
    """Human-comparable fingerprint of a peer's two public keys:
    BLAKE2b-160 (personalised), hex in ten groups of four."""
    digest = nacl.hash.blake2b(
        bytes(verify_key) + bytes(box_public_key),
        digest_size=20,
        person=_FP_PERSON,
        encoder=nacl.encoding.RawEncoder,
    )
    hx = digest.hex()
    return ":".join(hx[i : i + 4] for i in range(0, len(hx), 4))


@dataclass(frozen=True)
class PeerPublicKeys:
    """What everybody may know about a peer."""

    peer_id: int
    verify_key: VerifyKey
    box_public_key: PublicKey

    @property
    def fingerprint(self) -> str:
        return fingerprint(bytes(self.verify_key), bytes(self.box_public_key))

    def to_json(self) -> dict[str, str]:
        return {
            "verify_key": bytes(self.verify_key).hex(),
            "box_public_key": bytes(self.box_public_key).hex(),
            "fingerprint": self.fingerprint,
        }


@dataclass(frozen=True, repr=False, eq=False)
class PeerIdentity:
    """A peer's private keys.  ``repr`` never shows key material."""

    peer_id: int
    signing_key: SigningKey
    box_key: PrivateKey

    @classmethod
    def generate(cls, peer_id: int) -> PeerIdentity:
        """Fresh keys from the operating system's CSPRNG."""
        return cls(peer_id=peer_id, signing_key=SigningKey.generate(), box_key=PrivateKey.generate())

    @property
    def verify_key(self) -> VerifyKey:
        return self.signing_key.verify_key

    @property
    def box_public_key(self) -> PublicKey:
        return self.box_key.public_key

    @property
    def fingerprint(self) -> str:
        return fingerprint(bytes(self.verify_key), bytes(self.box_public_key))

    def public(self) -> PeerPublicKeys:
        return PeerPublicKeys(peer_id=self.peer_id, verify_key=self.verify_key, box_public_key=self.box_public_key)

    def __repr__(self) -> str:
        return f"PeerIdentity(peer_id={self.peer_id}, fingerprint={self.fingerprint!r})"


@dataclass(frozen=True)
class PeerDirectory:
    """The public directory: federation id and every peer's public keys.

    This file is the trust root: whoever can edit it can impersonate peers.
    Distribute it out of band and compare fingerprints (``secure-dfml keys show``).
    """

    federation_id: str
    peers: Mapping[int, PeerPublicKeys]

    def __post_init__(self) -> None:
        if not isinstance(self.federation_id, str) or not self.federation_id:
            raise KeyFileError("peer directory: federation_id must be a non-empty string")
        if not self.peers:
            raise KeyFileError("peer directory lists no peers")
        seen_sign: set[bytes] = set()
        seen_box: set[bytes] = set()
        for pid, pub in self.peers.items():
            if pid != pub.peer_id:
                raise KeyFileError(f"peer directory: entry {pid} holds the keys of peer {pub.peer_id}")
            vk, bk = bytes(pub.verify_key), bytes(pub.box_public_key)
            if vk in seen_sign or bk in seen_box:
                raise KeyFileError(f"peer directory: peer {pid} reuses another peer's public key")
            seen_sign.add(vk)
            seen_box.add(bk)

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self.peers

    def __len__(self) -> int:
        return len(self.peers)

    @property
    def peer_ids(self) -> list[int]:
        return sorted(self.peers)

    def lookup(self, peer_id: int) -> PeerPublicKeys:
        try:
            return self.peers[peer_id]
        except KeyError:
            raise UnknownPeerError(
                f"peer {peer_id} is not in the directory of federation {self.federation_id!r}"
            ) from None

    def to_json(self) -> str:
        doc = {
            "format": _DIRECTORY_FORMAT,
            "version": _FORMAT_VERSION,
            "federation_id": self.federation_id,
            "peers": {str(pid): self.peers[pid].to_json() for pid in self.peer_ids},
        }
        return json.dumps(doc, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, *, source: str = "peer directory") -> PeerDirectory:
        try:
            doc = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise KeyFileError(f"{source}: not valid JSON ({exc})") from None
        if not isinstance(doc, dict) or doc.get("format") != _DIRECTORY_FORMAT:
            raise KeyFileError(f"{source}: not a secure-dfml peer directory (format {_DIRECTORY_FORMAT!r} expected)")
        if doc.get("version") != _FORMAT_VERSION:
            raise KeyFileError(f"{source}: unsupported directory version {doc.get('version')!r}")
        fed = doc.get("federation_id")
        raw_peers = doc.get("peers")
        if not isinstance(fed, str) or not isinstance(raw_peers, dict):
            raise KeyFileError(f"{source}: needs 'federation_id' (string) and 'peers' (table)")
        peers: dict[int, PeerPublicKeys] = {}
        for key, entry in raw_peers.items():
            where = f"{source}: peer {key!r}"
            if not (isinstance(key, str) and key.isdigit() and len(key) <= 9):
                raise KeyFileError(f"{where}: peer ids must be non-negative integers")
            if not isinstance(entry, dict):
                raise KeyFileError(f"{where}: entry must be a table")
            vk = _hex32(entry.get("verify_key"), f"{where}.verify_key")
            bk = _hex32(entry.get("box_public_key"), f"{where}.box_public_key")
            pub = PeerPublicKeys(peer_id=int(key), verify_key=VerifyKey(vk), box_public_key=PublicKey(bk))
            if entry.get("fingerprint") != pub.fingerprint:
                raise KeyFileError(
                    f"{where}: fingerprint {entry.get('fingerprint')!r} does not match its keys "
                    f"({pub.fingerprint}); the directory was altered or corrupted"
                )
            peers[int(key)] = pub
        return cls(federation_id=fed, peers=peers)

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        write_key_file(p, self.to_json().encode("utf-8"), mode=0o644)
        return p

    @classmethod
    def load(cls, path: str | Path) -> PeerDirectory:
        p = Path(path)
        return cls.from_json(_read_limited(p, "peer directory").decode("utf-8", "replace"), source=str(p))


@dataclass(frozen=True)
class KeyRing:
    """A directory plus the private identities available locally.

    In a simulation every identity is local; a real peer holds only its own.
    ``warnings`` lists problems that did not stop loading (e.g. file modes).
    """

    directory: PeerDirectory
    identities: Mapping[int, PeerIdentity]
    warnings: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        for pid, ident in self.identities.items():
            if pid != ident.peer_id:
                raise KeyMismatchError(f"key ring: entry {pid} holds the identity of peer {ident.peer_id}")
            pub = self.directory.peers.get(pid)
            if pub is None:
                raise KeyMismatchError(f"private key of peer {pid} has no entry in the peer directory")
            if bytes(pub.verify_key) != bytes(ident.verify_key) or bytes(pub.box_public_key) != bytes(
                ident.box_public_key
            ):
                raise KeyMismatchError(
                    f"private key of peer {pid} does not match the directory's public keys "
                    f"(directory fingerprint {pub.fingerprint}, key file {ident.fingerprint})"
                )

    @property
    def federation_id(self) -> str:
        return self.directory.federation_id

    def identity(self, peer_id: int) -> PeerIdentity:
        try:
            return self.identities[peer_id]
        except KeyError:
            raise MissingKeyError(
                f"no private key for peer {peer_id} is loaded (local peers: {sorted(self.identities)})"
            ) from None


# --------------------------------------------------------------------------
# Generation


def generate_keys(num_peers: int, federation_id: str, *, first_peer_id: int = 0) -> KeyRing:
    """Fresh keys (OS CSPRNG) for peers ``first_peer_id .. first_peer_id+num_peers-1``."""
    if not isinstance(num_peers, int) or num_peers < 1:
        raise KeyFileError(f"num_peers = {num_peers!r}: expected an integer >= 1")
    if not isinstance(federation_id, str) or not federation_id:
        raise KeyFileError("federation_id must be a non-empty string")
    idents = {pid: PeerIdentity.generate(pid) for pid in range(first_peer_id, first_peer_id + num_peers)}
    directory = PeerDirectory(federation_id=federation_id, peers={pid: i.public() for pid, i in idents.items()})
    return KeyRing(directory=directory, identities=idents)


# --------------------------------------------------------------------------
# Files


def private_key_path(directory: str | Path, peer_id: int) -> Path:
    return Path(directory) / f"peer-{peer_id}.key"


def write_keys(
    directory: str | Path,
    keyring: KeyRing,
    *,
    passphrase: str | bytes | None = None,
    overwrite: bool = False,
    kdf: KdfStrength = "moderate",
) -> list[Path]:
    """Write ``directory.json`` (public) and one ``peer-<id>.key`` (mode 0600)
    per local identity.  With ``passphrase`` the private files are sealed
    (argon2id with the ``kdf`` limits, then SecretBox).  Refuses to replace
    existing key files unless ``overwrite``.  Returns the paths written."""
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise KeyFileError(f"{out} exists and is not a directory")
    targets = [out / DIRECTORY_FILE] + [private_key_path(out, pid) for pid in sorted(keyring.identities)]
    existing = [p for p in targets if p.exists()]
    if existing and not overwrite:
        raise KeyFileError(
            f"{existing[0]} already exists; refusing to overwrite keys (pass overwrite=True / --force)"
        )
    out.mkdir(parents=True, exist_ok=True, mode=0o700)

    key: bytes | None = None
    kdf_doc: dict[str, Any] | None = None
    if passphrase is not None:
        pw = _passphrase_bytes(passphrase)
        if kdf not in _KDF_LIMITS:
            raise KeyFileError(f"kdf = {kdf!r}: expected one of {', '.join(_KDF_LIMITS)}")
        ops, mem = _KDF_LIMITS[kdf]
        salt = nacl.utils.random(nacl.pwhash.argon2id.SALTBYTES)
        key = nacl.pwhash.argon2id.kdf(nacl.secret.SecretBox.KEY_SIZE, pw, salt, opslimit=ops, memlimit=mem)
        kdf_doc = {"name": "argon2id13", "opslimit": ops, "memlimit": mem, "salt": salt.hex()}

    written: list[Path] = []
    fed = keyring.federation_id
    for pid in sorted(keyring.identities):
        ident = keyring.identities[pid]
        secret_doc = {
            "federation_id": fed,
            "peer_id": pid,
            "signing_seed": bytes(ident.signing_key).hex(),
            "box_secret_key": bytes(ident.box_key).hex(),
        }
        doc: dict[str, Any] = {"format": _PRIVATE_FORMAT, "version": _FORMAT_VERSION, "federation_id": fed, "peer_id": pid}
        if key is None:
            doc["protection"] = "none"
            doc.update({k: secret_doc[k] for k in ("signing_seed", "box_secret_key")})
        else:
            doc["protection"] = "argon2id-secretbox"
            doc["kdf"] = kdf_doc
            doc["sealed"] = nacl.secret.SecretBox(key).encrypt(json.dumps(secret_doc).encode("utf-8")).hex()
        path = private_key_path(out, pid)
        write_key_file(path, (json.dumps(doc, indent=2) + "\n").encode("utf-8"), mode=0o600)
        written.append(path)
    # The directory goes last: a crash midway leaves no directory.json, which
    # load_keys reports clearly instead of half-loading.
    written.insert(0, keyring.directory.save(out / DIRECTORY_FILE))
    logger.info("wrote peer directory and %d private key file(s) to %s", len(keyring.identities), out)
    return written


def load_directory(directory: str | Path) -> PeerDirectory:
    """Read only the public peer directory of a key folder."""
    d = Path(directory)
    path = d / DIRECTORY_FILE if d.is_dir() or not d.suffix else d
    if not path.is_file():
        raise KeyFileError(
            f"no peer directory at {path}; create keys with `secure-dfml keys init --peers N --out {d}`"
        )
    return PeerDirectory.load(path)


def load_keys(
    directory: str | Path,
    *,
    passphrase: str | bytes | None = None,
    peers: Iterable[int] | None = None,
    allow_exposed_keys: bool = False,
) -> KeyRing:
    """Load the directory and private keys from a folder written by
    :func:`write_keys`.

    ``peers``: the identities that must be present (error if one is missing);
    ``None`` loads every ``peer-<id>.key`` found.  A private file readable by
    group/others is refused, unless ``allow_exposed_keys`` (then it is logged
    and listed in ``KeyRing.warnings``).
    """
    d = Path(directory)
    if not d.is_dir():
        raise KeyFileError(f"key directory {d} does not exist; create it with `secure-dfml keys init`")
    pubdir = load_directory(d)
    wanted = list(pubdir.peer_ids) if peers is None else sorted(set(peers))
    for pid in wanted:
        if pid not in pubdir:
            raise KeyMismatchError(f"peer {pid} is not in the directory {d / DIRECTORY_FILE}")
    warnings: list[str] = []
    idents: dict[int, PeerIdentity] = {}
    key_cache: dict[tuple[str, int, int], bytes] = {}
    pw = None if passphrase is None else _passphrase_bytes(passphrase)
    for pid in wanted:
        path = private_key_path(d, pid)
        if not path.is_file():
            if peers is None:
                continue
            raise KeyFileError(f"missing private key file {path} for peer {pid}")
        warn = _permission_warning(path)
        if warn and not allow_exposed_keys:
            raise KeyFileError(
                f"{warn}. Refusing to use a private key other users can read (like ssh); fix the mode, or opt in "
                "explicitly with crypto.allow_exposed_keys = true"
            )
        if warn:
            logger.warning(warn)
            warnings.append(warn)
        idents[pid] = _read_private(path, pid, pubdir.federation_id, pw, key_cache)
    return KeyRing(directory=pubdir, identities=idents, warnings=tuple(warnings))


def _read_private(
    path: Path, pid: int, federation_id: str, pw: bytes | None, key_cache: dict[tuple[str, int, int], bytes]
) -> PeerIdentity:
    try:
        doc = json.loads(_read_limited(path, "private key file"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"{path}: not a valid key file ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != _PRIVATE_FORMAT or doc.get("version") != _FORMAT_VERSION:
        raise KeyFileError(f"{path}: not a secure-dfml private key file (version {_FORMAT_VERSION})")
    if doc.get("peer_id") != pid or doc.get("federation_id") != federation_id:
        raise KeyMismatchError(
            f"{path}: belongs to peer {doc.get('peer_id')!r} of federation {doc.get('federation_id')!r}, "
            f"expected peer {pid} of {federation_id!r}"
        )
    protection = doc.get("protection")
    if protection == "none":
        secret = doc
    elif protection == "argon2id-secretbox":
        if pw is None:
            raise PassphraseRequiredError(
                f"{path} is sealed with a passphrase; provide it with --passphrase-file FILE (secure-dfml run, "
                "peer) or the SECURE_DFML_KEY_PASSPHRASE environment variable"
            )
        secret = _unseal(path, doc, pw, key_cache)
        if secret.get("peer_id") != pid or secret.get("federation_id") != federation_id:
            raise KeyMismatchError(f"{path}: sealed content belongs to another peer or federation")
    else:
        raise KeyFileError(f"{path}: unknown protection {protection!r}")
    seed = _hex32(secret.get("signing_seed"), f"{path}: signing_seed")
    box = _hex32(secret.get("box_secret_key"), f"{path}: box_secret_key")
    return PeerIdentity(peer_id=pid, signing_key=SigningKey(seed), box_key=PrivateKey(box))


def _unseal(path: Path, doc: Mapping[str, Any], pw: bytes, key_cache: dict[tuple[str, int, int], bytes]) -> dict[str, Any]:
    kdf = doc.get("kdf")
    if not isinstance(kdf, dict) or kdf.get("name") != "argon2id13":
        raise KeyFileError(f"{path}: unknown key derivation {kdf!r}")
    ops, mem, salt_hex = kdf.get("opslimit"), kdf.get("memlimit"), kdf.get("salt")
    if not (
        isinstance(ops, int)
        and isinstance(mem, int)
        and nacl.pwhash.argon2id.OPSLIMIT_MIN <= ops <= _MAX_OPSLIMIT
        and nacl.pwhash.argon2id.MEMLIMIT_MIN <= mem <= _MAX_MEMLIMIT
        and isinstance(salt_hex, str)
    ):
        raise KeyFileError(f"{path}: key derivation limits out of range")
    try:
        salt = bytes.fromhex(salt_hex)
        sealed = bytes.fromhex(str(doc.get("sealed", "")))
    except ValueError:
        raise KeyFileError(f"{path}: salt / sealed content is not hex") from None
    if len(salt) != nacl.pwhash.argon2id.SALTBYTES:
        raise KeyFileError(f"{path}: salt must be {nacl.pwhash.argon2id.SALTBYTES} bytes")
    cache_key = (salt_hex, ops, mem)
    if cache_key not in key_cache:
        key_cache[cache_key] = nacl.pwhash.argon2id.kdf(
            nacl.secret.SecretBox.KEY_SIZE, pw, salt, opslimit=ops, memlimit=mem
        )
    try:
        plain = nacl.secret.SecretBox(key_cache[cache_key]).decrypt(sealed)
    except (nacl.exceptions.CryptoError, nacl.exceptions.ValueError, ValueError):
        raise WrongPassphraseError(f"wrong passphrase for {path} (or the file was altered)") from None
    try:
        secret = json.loads(plain)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise KeyFileError(f"{path}: sealed content is not valid") from None
    if not isinstance(secret, dict):
        raise KeyFileError(f"{path}: sealed content is not valid")
    return secret


# --------------------------------------------------------------------------
# Helpers


def _passphrase_bytes(passphrase: str | bytes) -> bytes:
    pw = passphrase.encode("utf-8") if isinstance(passphrase, str) else bytes(passphrase)
    if not pw:
        raise KeyFileError("the passphrase is empty")
    return pw


def _hex32(value: object, where: str) -> bytes:
    if not isinstance(value, str) or len(value) != 64:
        raise KeyFileError(f"{where}: expected 64 hex characters")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise KeyFileError(f"{where}: expected 64 hex characters") from None


def _read_limited(path: Path, what: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            data = fh.read(_MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise KeyFileError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} {path}: {exc.strerror}") from None
    if len(data) > _MAX_FILE_BYTES:
        raise KeyFileError(f"{what} {path} is larger than {_MAX_FILE_BYTES} bytes")
    return data


def _permission_warning(path: Path) -> str | None:
    if os.name != "posix":
        return None
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        return (
            f"private key file {path} has mode {mode:04o}: other users may read it; "
            f"run `chmod 600 {path}`"
        )
    return None


def write_key_file(path: Path, data: bytes, *, mode: int) -> None:
    """Write ``data`` to ``path`` via a same-folder temporary file created with
    ``mode`` (never wider), fsync, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{nacl.utils.random(6).hex()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(tmp, flags, mode)
    try:
        try:
            if hasattr(os, "fchmod"):
                os.fchmod(fd, mode)  # umask may only narrow; make the mode exact
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if hasattr(os, "O_DIRECTORY"):
        try:
            dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return
        try:
            os.fsync(dfd)
        except OSError:
            pass
        finally:
            os.close(dfd)
