"""What a passive eavesdropper learns from the traffic of a run.

The eavesdropper records every message on the wire but holds no peer's private
key.  When the run directory has ``capture/`` (every envelope exactly as it was
sent, written by :class:`~secure_dfml.transport.CaptureTap`), the analysis
reads those envelopes and measures:

* **what it reads in clear** -- each header's federation tag, round, sender,
  recipient, message kind, padding flag and sizes (authenticated, not
  encrypted), checked against the transport's routing; from these alone, who
  talked to whom in every round (the groups' aggregators and senders, compared
  with ``metrics.jsonl``) and whether any nonce was ever reused;
* **that it cannot open them** -- every captured envelope is opened with keys
  the attacker can have: a freshly generated key ring for the same federation
  (fails the sender's signature), its own box key for the raw ``crypto_box``
  decryption with the signature check skipped (fails the authenticator), and,
  when the run's public peer directory is on disk (``crypto.keys_dir``, as for
  launched runs), the real directory with its own key posing as the recipient
  (the signature verifies, decryption fails); every failure is a typed
  :class:`~secure_dfml.errors.CryptoError`;
* **byte uniformity of the ciphertext** -- each body's byte histogram against
  the uniform distribution (chi-square p-value, Bonferroni over envelopes),
  next to a plaintext payload (a final model) for contrast;
* **what sizes reveal** -- the size of every captured model message against
  the envelope size of each architecture of the public model zoo, with and
  without ``crypto.pad_messages``: without padding each architecture has its
  own size, so the eavesdropper learns which architecture a peer runs; with
  padding, architectures in one size bucket are indistinguishable.

With ``crypto.channel = "none"`` the captured messages are the payloads: the
eavesdropper decodes every model, which this analysis demonstrates (against
``views/received``) and flags.

Run directories written before traffic capture have no ``capture/``: for them
the analysis falls back to re-sealing each peer's final model with the run's
channel settings and fresh keys, and says so in its results (``source =
"resealed"``) and findings -- what the envelope format discloses, not what
was sent.
"""

from __future__ import annotations

import dataclasses
import html
import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nacl.bindings
import nacl.exceptions
import numpy as np
import torch
from scipy import stats

from secure_dfml.audit._federation import ModelTarget, load_model, rebuild_federation, results_header, selected_peers
from secure_dfml.audit._threat_models import ThreatModel
from secure_dfml.audit.report import Finding, by_severity, finding, html_table, render_simple_html
from secure_dfml.config import CryptoConfig, RunConfig
from secure_dfml.crypto import (
    DIRECTORY_FILE,
    HEADER_BYTES,
    DecryptionError,
    EnvelopeHeader,
    KeyRing,
    NaClChannel,
    PeerDirectory,
    PeerIdentity,
    build_channel,
    decode_state,
    encode_state,
    federation_tag,
    generate_keys,
    inspect_envelope,
    load_directory,
    schema_of,
)
from secure_dfml.errors import AuditError, CryptoError, RunDirectoryError, SecureDFMLError
from secure_dfml.models import available_models, build_model, count_parameters
from secure_dfml.protocol.strategies import MODEL, RETURN
from secure_dfml.rundir import (
    CAPTURE,
    VIEW_RECEIVED,
    capture_dir,
    model_file,
    models_dir,
    read_capture_of,
    read_metrics,
    read_state,
    read_summary,
    view_file,
)
from secure_dfml.transport import CapturedMessage

__all__ = ["analyse_envelopes", "byte_uniformity_p_value"]

_LOG = logging.getLogger(__name__)

_KIND = MODEL  # the re-sealed envelopes of older runs
_ROUND = 0
_ALPHA = 1e-3  # family-wise level for the uniformity test (Bonferroni over envelopes)
_MIN_TEST_BYTES = 256 * 5
_HTML_ROWS = 200  # envelopes listed in report.html (results.json has them all)
#: message kinds that carry a whole model (safetensors payload)
_MODEL_KINDS = (MODEL, RETURN)


def byte_uniformity_p_value(data: bytes) -> float:
    """Chi-square p-value of ``data``'s byte histogram against 256 equiprobable values.

    Near-uniform for ciphertext (p roughly uniform on [0, 1]); essentially 0
    for structured plaintext such as float tensors.
    """
    if len(data) < _MIN_TEST_BYTES:
        raise AuditError(f"need at least {_MIN_TEST_BYTES} bytes for a byte-histogram chi-square test; got {len(data)}")
    counts = np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256)
    return float(stats.chisquare(counts).pvalue)


def _p_or_none(data: bytes) -> float | None:
    return byte_uniformity_p_value(data) if len(data) >= _MIN_TEST_BYTES else None


def _attempt(fn: Callable[[], Any]) -> dict[str, Any]:
    try:
        fn()
    except CryptoError as exc:
        return {"opened": False, "error": type(exc).__name__, "crypto_error": True, "message": str(exc)}
    except SecureDFMLError as exc:
        return {"opened": False, "error": type(exc).__name__, "crypto_error": False, "message": str(exc)}
    return {"opened": True, "error": None, "crypto_error": False, "message": "the envelope opened"}


def _fresh_model(arch: str, dataset: Any, seed: int) -> torch.nn.Module:
    return build_model(arch, input_shape=dataset.input_shape, num_classes=dataset.num_classes, kind=dataset.kind,
                       generator=torch.Generator().manual_seed(seed))


def analyse_envelopes(
    run_dir: Path, cfg: RunConfig, tm: ThreatModel, *, peers: Sequence[int] | None = None
) -> tuple[dict[str, Any], str]:
    """The eavesdropper analysis of a run: (results dict, self-contained HTML report).

    Reads the traffic captured in ``run_dir/capture/``; a run directory
    without it (written before traffic capture) gets the older analysis of
    re-sealed final models, labelled ``source = "resealed"``.  ``peers``:
    only the messages these peers sent.
    """
    fed = rebuild_federation(cfg)
    captured = read_capture_of(run_dir)
    if captured is None:
        _LOG.warning("%s has no %s/ (a run written before traffic capture): analysing re-sealed final models "
                     "instead of the traffic that was sent", run_dir, CAPTURE)
        results = _analyse_resealed(run_dir, cfg, tm, fed, peers)
    else:
        results = _analyse_captured(run_dir, cfg, tm, fed, captured, peers)
    return results, _render(results, tm)


# ----------------------------------------------------------------------------- captured traffic
def _public_directory(cfg: RunConfig) -> tuple[PeerDirectory | None, str]:
    """The run's public peer directory, when it is on disk (keys_dir), and where from."""
    if not cfg.crypto.keys_dir:
        return None, ("the run used ephemeral keys that were never stored, so its public directory is unknown here "
                      "(a deployment's is public: launched runs and crypto.keys_dir keep it)")
    where = Path(cfg.crypto.keys_dir) / DIRECTORY_FILE
    try:
        directory = load_directory(cfg.crypto.keys_dir)
    except SecureDFMLError as exc:
        return None, f"the run's public directory {where} cannot be read ({exc})"
    if directory.federation_id != cfg.federation.id:
        return None, (f"{where} belongs to federation {directory.federation_id!r}, not {cfg.federation.id!r}; "
                      "it was not used")
    return directory, f"the run's public directory {where}"


@dataclass
class _Attackers:
    """The keys an eavesdropper can hold, and its attempts to open one envelope."""

    crypto: CryptoConfig
    federation_id: str
    endpoints: int
    directory: PeerDirectory | None

    def __post_init__(self) -> None:
        self.fresh = self._channel(generate_keys(self.endpoints, self.federation_id))
        me, other = PeerIdentity.generate(0), PeerIdentity.generate(1)
        self.raw_key = nacl.bindings.crypto_box_beforenm(bytes(other.box_public_key), bytes(me.box_key))

    def _channel(self, keyring: KeyRing) -> NaClChannel:
        return NaClChannel(keyring=keyring, max_message_bytes=self.crypto.max_message_bytes,
                           pad_messages=self.crypto.pad_messages)

    def _raw_decrypt(self, env: bytes, hdr: EnvelopeHeader) -> None:
        body = env[HEADER_BYTES: HEADER_BYTES + hdr.body_length]
        try:
            nacl.bindings.crypto_box_open_easy_afternm(body, hdr.nonce, self.raw_key)
        except nacl.exceptions.CryptoError:
            raise DecryptionError("crypto_box authenticator does not verify under the attacker's own box key") from None

    def _impostor(self, recipient: int) -> NaClChannel | None:
        if self.directory is None or recipient not in self.directory:
            return None
        impostor = PeerIdentity.generate(recipient)
        fake = PeerDirectory(federation_id=self.federation_id,
                             peers={**self.directory.peers, recipient: impostor.public()})
        return self._channel(KeyRing(directory=fake, identities={recipient: impostor}))

    def attempts(self, env: bytes, hdr: EnvelopeHeader, c: CapturedMessage) -> list[dict[str, Any]]:
        ctx = {"sender": c.sender, "recipient": c.recipient, "round_index": c.round_index, "kind": c.kind}
        out = [
            {"attacker": "fresh key ring for the same federation, opening as the recipient",
             **_attempt(lambda: self.fresh.open(env, **ctx))},
            {"attacker": "own box key, raw crypto_box decryption (signature check skipped)",
             **_attempt(lambda: self._raw_decrypt(env, hdr))},
        ]
        impostor = self._impostor(c.recipient)
        if impostor is not None:
            out.append({"attacker": "the run's public directory + own box key, posing as the recipient",
                        **_attempt(lambda: impostor.open(env, **ctx))})
        return out


def _model_arch(c: CapturedMessage, archs: Sequence[str]) -> str | None:
    """The architecture a model message carries (the public directory's): a sent
    model is its sender's, a returned model its recipient's."""
    if c.kind == MODEL and 0 <= c.sender < len(archs):
        return archs[c.sender]
    if c.kind == RETURN and 0 <= c.recipient < len(archs):
        return archs[c.recipient]
    return None


def _payload_text(kind: str) -> str:
    if kind in _MODEL_KINDS:
        return "a model (safetensors)"
    if kind.startswith("ckks-ctx"):
        return "a CKKS public context"
    if kind.startswith("ckks-ct-") or kind.startswith("ckks-sum"):
        return "CKKS ciphertexts (encrypted under the round's CKKS key)"
    if kind.startswith("ckks-avg"):
        return "the released group average, in clear"
    return f"a {kind!r} payload"


def _traffic(entries: Sequence[Mapping[str, Any]], records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What the headers tell about who talked to whom, per kind and per round."""
    by_kind: dict[str, dict[str, Any]] = {}
    links: Counter[tuple[int, int]] = Counter()
    link_bytes: Counter[tuple[int, int]] = Counter()
    rounds: dict[int, dict[str, set[int]]] = {}
    for e in entries:
        k = by_kind.setdefault(e["kind"], {"messages": 0, "bytes": 0, "sizes": set()})
        k["messages"] += 1
        k["bytes"] += e["envelope_bytes"]
        k["sizes"].add(e["envelope_bytes"])
        links[(e["sender"], e["recipient"])] += 1
        link_bytes[(e["sender"], e["recipient"])] += e["envelope_bytes"]
        if e["kind"] == MODEL or e["kind"].startswith("ckks-ct-"):  # a sender's model, in clear or under CKKS
            r = rounds.setdefault(e["round"], {"aggregators": set(), "senders": set()})
            r["aggregators"].add(e["recipient"])
            r["senders"].add(e["sender"])
    inferred = {t: {"aggregators": sorted(v["aggregators"]), "senders": sorted(v["senders"])}
                for t, v in sorted(rounds.items())}
    recorded: dict[int, list[int]] = {}
    for rec in records:
        aggs = sorted({int(g["aggregator"]) for g in rec.get("groups", []) if g.get("senders")})
        recorded[int(rec.get("round", len(recorded)))] = aggs
    matched = sum(1 for t, aggs in recorded.items() if inferred.get(t, {}).get("aggregators", []) == aggs)
    return {
        "messages": len(entries),
        "bytes": sum(e["envelope_bytes"] for e in entries),
        "by_kind": {k: {**v, "sizes": sorted(v["sizes"]), "carries": _payload_text(k)} for k, v in sorted(by_kind.items())},
        "links": [{"sender": s, "recipient": r, "messages": n, "bytes": link_bytes[(s, r)]}
                  for (s, r), n in sorted(links.items())],
        "rounds": {str(t): v for t, v in inferred.items()},
        "rounds_recorded": len(recorded),
        "rounds_with_aggregators_as_recorded": matched,
    }


def _plaintext_contrast(run_dir: Path, fed: Any, wanted: Sequence[int]) -> dict[str, float]:
    """Byte-uniformity p of one final model payload per architecture (plaintext, for contrast)."""
    out: dict[str, float] = {}
    for i in wanted:
        arch = fed.peers[i].arch
        f = model_file(run_dir, i, "final")
        if arch in out or not f.is_file():
            continue
        try:
            state, _meta = read_state(f)
        except RunDirectoryError as exc:
            _LOG.info("plaintext contrast: skipping %s: %s", f, exc)
            continue
        p = _p_or_none(encode_state(state))
        if p is not None:
            out[arch] = p
    return out


def _received_view(run_dir: Path, sender: int) -> tuple[int, dict[str, torch.Tensor]] | None:
    """(round, state) of ``views/received/peer_<sender>``, if the run kept it."""
    f = view_file(run_dir, VIEW_RECEIVED, sender)
    if not f.is_file():
        return None
    try:
        state, meta = read_state(f)
    except RunDirectoryError:
        return None
    return int(meta.get("round", -1)), state


def _analyse_captured(run_dir: Path, cfg: RunConfig, tm: ThreatModel, fed: Any, captured: Sequence[CapturedMessage],
                      peers: Sequence[int] | None) -> dict[str, Any]:
    ds = fed.dataset
    archs = list(fed.directory.archs)  # peers, then the virtual server of fedavg-central (if any)
    peer_archs = [p.arch for p in fed.peers]
    wanted = selected_peers(peers, len(peer_archs))
    chosen = [c for c in captured if peers is None or c.sender in wanted]
    secure = cfg.crypto.channel == "nacl"
    fid = cfg.federation.id
    tag = federation_tag(fid)
    directory, directory_text = _public_directory(cfg) if secure else (None, "")
    attackers = _Attackers(cfg.crypto, fid, len(archs), directory) if secure else None
    records = read_metrics(run_dir)
    summary = read_summary(run_dir) or {}

    entries: list[dict[str, Any]] = []
    cipher_p: list[float] = []
    nonces: list[bytes] = []
    malformed: list[str] = []
    decoded_models = 0
    matches_view = 0
    model_messages = 0
    for c in chosen:
        data = c.data()
        arch = _model_arch(c, archs)
        entry: dict[str, Any] = {
            "file": c.path.name, "round": c.round_index, "sender": c.sender, "peer": c.sender,
            "recipient": c.recipient, "kind": c.kind, "arch": arch, "envelope_bytes": len(data),
        }
        if arch is not None:
            model_messages += 1
        if attackers is not None:
            try:
                hdr = inspect_envelope(data, max_envelope_bytes=cfg.crypto.max_message_bytes)
            except CryptoError as exc:
                malformed.append(f"{c.path.name}: {exc}")
                entry.update({"visible_metadata": None, "malformed": str(exc), "attempts": []})
                entries.append(entry)
                continue
            entry["visible_metadata"] = {
                "federation_tag": hdr.federation_tag.hex(), "round": hdr.round_index, "sender": hdr.sender,
                "recipient": hdr.recipient, "kind": hdr.kind, "padded": hdr.padded,
                "content_signature": hdr.content_signature, "nonce": hdr.nonce.hex(), "body_bytes": hdr.body_length,
            }
            entry["header_matches_routing"] = (hdr.round_index, hdr.sender, hdr.recipient, hdr.kind) == (
                c.round_index, c.sender, c.recipient, c.kind)
            entry["federation_tag_matches"] = hdr.federation_tag == tag
            nonces.append(hdr.nonce)
            p = _p_or_none(data[HEADER_BYTES: HEADER_BYTES + hdr.body_length])
            entry["ciphertext_uniformity_p"] = p
            if p is not None:
                cipher_p.append(p)
            entry["attempts"] = attackers.attempts(data, hdr, c)
            if len(entry["attempts"]) > 2:
                entry["signature_verified_with_public_directory"] = entry["attempts"][2]["error"] == "DecryptionError"
        else:  # crypto.channel = "none": what travelled is the payload itself
            attempt: dict[str, Any] = {"attacker": "passive listener, no keys", "opened": True, "error": None,
                                       "crypto_error": False}
            if arch is not None:
                schema_peer = c.sender if c.kind == MODEL else c.recipient
                try:
                    decoded = decode_state(data, fed.directory.schemas[schema_peer])
                except SecureDFMLError as exc:
                    attempt.update({"recovered_parameters": False, "message": f"not a {arch} model: {exc}"})
                else:
                    decoded_models += 1
                    attempt["recovered_parameters"] = True
                    attempt["message"] = f"decoded all {sum(v.numel() for v in decoded.values())} parameters ({arch})"
                    view = _received_view(run_dir, c.sender) if c.kind == MODEL else None
                    if view is not None and view[0] == c.round_index:
                        same = all(torch.equal(decoded[k], view[1][k]) for k in view[1])
                        attempt["equals_model_as_received"] = bool(same)
                        matches_view += bool(same)
            else:
                attempt["message"] = f"read {len(data)} bytes of {_payload_text(c.kind)}"
            entry["attempts"] = [attempt]
        entries.append(entry)

    sizes = _size_table(cfg, ds, peer_archs, wanted, cfg.crypto, fid, len(archs), available_models(ds.kind))
    size_findings: list[Finding] = sizes.pop("_findings")
    sizes["captured"] = _captured_sizes(entries, sizes["architectures"], cfg.crypto)
    traffic = _traffic(entries, records)
    attempts = [a for e in entries for a in e["attempts"]]
    opened = [a for a in attempts if a["opened"]] if secure else []
    plain_p = _plaintext_contrast(run_dir, fed, wanted)

    findings: list[Finding] = []
    n_env = len(entries)
    if not entries:
        findings.append(finding("note", f"{capture_dir(run_dir)} holds no message sent by the requested peers "
                                        "(algorithm 'local' exchanges none); there was nothing on the wire to analyse."))
    if not secure:
        findings.append(finding(
            "insecure",
            f"crypto.channel = \"none\": an eavesdropper reads every message on the wire in clear: it decoded "
            f"{decoded_models} of {model_messages} captured model messages"
            + (f" ({matches_view} checked equal to the model the aggregator received)" if matches_view else "")
            + ". It can run every membership attack of the curious-aggregator threat model; audit that view too, "
              "and use crypto.channel = \"nacl\" for any deployment.",
        ))
    elif entries:
        if opened:
            findings.append(finding("fail", f"an attacker without the recipient's private key opened {len(opened)} "
                                            "captured envelope(s); the channel is broken."))
        else:
            errors = Counter(a["error"] for a in attempts)
            findings.append(finding(
                "note",
                f"An eavesdropper without keys opened none of {n_env} captured envelopes ({len(attempts)} attempts, "
                f"every one a typed CryptoError: {', '.join(f'{k} x{v}' for k, v in sorted(errors.items()))}). A "
                "fresh key ring fails the sender's signature; its own box key fails crypto_box's authenticator"
                + ("; posing as the recipient with the run's real public directory, the signature verifies but "
                   "decryption fails." if directory is not None else f". Posing as the recipient with the run's "
                   f"public directory was not tried: {directory_text}."),
            ))
        if malformed:
            findings.append(finding("warning", f"{len(malformed)} captured file(s) are not well-formed envelopes "
                                               f"(e.g. {malformed[0]}); investigate the capture."))
        bad_route = [e["file"] for e in entries if e.get("header_matches_routing") is False]
        if bad_route:
            findings.append(finding("warning", f"{len(bad_route)} envelope header(s) disagree with the transport's "
                                               f"routing (e.g. {bad_route[0]})."))
        if cipher_p:
            pmin = min(cipher_p)
            thr = _ALPHA / len(cipher_p)
            contrast = (f"; plaintext model payloads give p ~ {max(plain_p.values()):.1g}" if plain_p else "")
            if pmin < thr:
                findings.append(finding("warning", f"a captured ciphertext's byte histogram deviates from uniform "
                                                   f"(chi-square p = {pmin:.2g} < {thr:.2g}); investigate the "
                                                   "envelope format."))
            else:
                findings.append(finding(
                    "note",
                    f"Captured ciphertext bytes are consistent with uniform (byte-histogram chi-square, smallest p = "
                    f"{pmin:.3f} over {len(cipher_p)} envelopes, Bonferroni threshold {thr:.2g}{contrast}): the "
                    "bytes reveal nothing about the weights.",
                ))
        if nonces:
            if len(set(nonces)) == len(nonces):
                findings.append(finding("note", f"All {len(nonces)} nonces are distinct (fresh random nonce per "
                                                "envelope): no two envelopes can be linked by their content."))
            else:
                findings.append(finding("warning", f"{len(nonces) - len(set(nonces))} nonce(s) occur more than once "
                                                   "in the capture: nonce reuse breaks crypto_box's confidentiality."))
        tags = {e["visible_metadata"]["federation_tag"] for e in entries if e.get("visible_metadata")}
        findings.append(finding(
            "note",
            "Read in clear from every header (authenticated, not encrypted): federation tag"
            + (" (one value in all envelopes, a fixed hash of the federation id: it links them to one federation "
               "and confirms any id the eavesdropper guesses)" if len(tags) == 1 else "")
            + ", round, sender, recipient, message kind, padding flag and sizes. From these alone it sees who talks "
              "to whom and when: it names each round's aggregators from the models (or CKKS ciphertexts) they "
              "receive"
            + (f" ({traffic['rounds_with_aggregators_as_recorded']} of {traffic['rounds_recorded']} rounds exactly as "
               "metrics.jsonl records them)." if traffic["rounds_recorded"] else "."),
        ))
        if directory is not None and all(e.get("signature_verified_with_public_directory") for e in entries):
            findings.append(finding(
                "note",
                "With the public directory every captured signature verifies: an eavesdropper can prove to third "
                "parties which peer sent each envelope (of which size, to whom, in which round).",
            ))
    findings.extend(_captured_size_findings(sizes["captured"], cfg.crypto))
    findings.extend(size_findings)
    if cfg.crypto.secure_aggregation == "ckks":
        findings.append(finding("note", "CKKS secure averaging is on: CKKS contexts, ciphertexts and sums travel too "
                                        "(see the traffic by kind); their sizes depend only on the parameter count "
                                        "and the CKKS parameters, so they reveal the architecture's size as well."))
    findings.append(finding(
        "note",
        f"Measured on the {len(captured)} envelopes captured on the wire during the run ({capture_dir(run_dir)}"
        + ("" if peers is None else f"; {n_env} sent by peers {wanted}")
        + "). This shows what the traffic discloses; confidentiality itself rests on NaCl's security and on "
          "private keys staying private (see the threat model's assumptions), which no test can prove.",
    ))

    keys = "attacker keys generated for this analysis"
    if directory is not None:
        keys += f", and {directory_text}"
    results: dict[str, Any] = {
        **results_header(run_dir, cfg, tm, fed),
        "status": "analysed",
        "source": "capture",
        "source_description": f"envelopes captured on the wire during the run ({capture_dir(run_dir)}, "
                              f"{len(captured)} messages)",
        "channel": {"name": cfg.crypto.channel, "secure": secure,
                    "description": str(summary.get("channel_description") or _channel_text(cfg.crypto)),
                    "keys": keys if secure else "none needed"},
        "traffic": traffic,
        "envelopes": entries,
        "attempts": {"total": len(attempts), "opened": len(attempts) if not secure else len(opened),
                     "errors": dict(Counter(a["error"] for a in attempts if a["error"]))},
        "uniformity": {"tested": len(cipher_p), "min_p": min(cipher_p) if cipher_p else None,
                       "threshold": _ALPHA / len(cipher_p) if cipher_p else None, "plaintext_p": plain_p},
        "sizes": sizes,
        "fail": (not secure and bool(entries)) or bool(opened),
        "findings": by_severity(findings),
    }
    return results


def _channel_text(crypto: CryptoConfig) -> str:
    if crypto.channel != "nacl":
        return "plaintext (crypto.channel = \"none\")"
    pad = ", payloads padded to power-of-two size buckets" if crypto.pad_messages else ""
    return f"NaCl envelopes (X25519 crypto_box + Ed25519 signatures){pad}"


def _captured_sizes(entries: Sequence[Mapping[str, Any]], table: Mapping[str, Mapping[str, Any]],
                    crypto: CryptoConfig) -> list[dict[str, Any]]:
    """Per (architecture, kind) of the captured model messages: the sizes seen
    on the wire, the size the zoo table predicts under the run's padding, and
    the architectures an eavesdropper would name from that size."""
    column = "envelope_bytes_padded" if crypto.channel == "nacl" and crypto.pad_messages else "envelope_bytes_unpadded"
    seen: dict[tuple[str, str], Counter[int]] = {}
    for e in entries:
        if e.get("arch") is not None:
            seen.setdefault((e["arch"], e["kind"]), Counter())[e["envelope_bytes"]] += 1
    rows = []
    for (arch, kind), sizes in sorted(seen.items()):
        predicted = table.get(arch, {}).get(column)
        observed = sorted(sizes)
        rows.append({
            "arch": arch, "kind": kind, "messages": sum(sizes.values()), "observed_sizes": observed,
            "predicted_size": predicted, "as_predicted": observed == [predicted],
            "candidates": sorted(a for a, r in table.items() if r.get(column) in sizes),
        })
    return rows


def _captured_size_findings(rows: Sequence[Mapping[str, Any]], crypto: CryptoConfig) -> list[Finding]:
    if not rows:
        return []
    out: list[Finding] = []
    odd = [r for r in rows if not r["as_predicted"]]
    pad = "on" if crypto.channel == "nacl" and crypto.pad_messages else "off"
    if odd:
        out.append(finding("warning", "captured model messages of " + ", ".join(
            f"{r['arch']} ({r['kind']}: sizes {r['observed_sizes']}, predicted {r['predicted_size']})" for r in odd)
            + f" differ from the size the envelope format predicts with padding {pad}; investigate."))
    else:
        n = sum(r["messages"] for r in rows)
        out.append(finding(
            "note",
            f"Every one of the {n} captured model messages has exactly the size its architecture predicts with "
            f"padding {pad}: one size per architecture for the whole run, whatever the weights, so sizes reveal the "
            "architecture (see below), never the weights.",
        ))
    return out


# ----------------------------------------------------------------------------- older runs: re-sealed models
def _analyse_resealed(run_dir: Path, cfg: RunConfig, tm: ThreatModel, fed: Any,
                      peers: Sequence[int] | None) -> dict[str, Any]:
    """The analysis for run directories without ``capture/``: each peer's final
    model sealed again with the run's channel settings and fresh keys."""
    ds = fed.dataset
    archs = [p.arch for p in fed.peers]
    n = len(archs)
    wanted = selected_peers(peers, n)
    if not models_dir(run_dir).is_dir():
        raise AuditError(f"{run_dir} has neither {CAPTURE}/ nor models/: the eavesdropper analysis reads the captured "
                         "traffic, or for older runs seals the peers' final models again")

    crypto = dataclasses.replace(cfg.crypto, keys_dir=None)  # ephemeral keys, never the run's key files
    channel, description = build_channel(crypto, federation_id=cfg.federation.id, num_peers=n)
    secure = bool(channel.secure)
    fid = cfg.federation.id

    envelopes: list[dict[str, Any]] = []
    cipher_p: list[float] = []
    opened_any = False
    for i in wanted:
        f = model_file(run_dir, i, "final")
        if not f.is_file():
            raise AuditError(f"{f} is missing: the eavesdropper analysis needs each peer's final model")
        model = load_model(ModelTarget(f"{i} final", i, f, "final", archs[i]), ds)
        state = model.state_dict()
        payload = encode_state(state)
        recipient = (i + 1) % n
        env = channel.seal(payload, sender=i, recipient=recipient, round_index=_ROUND, kind=_KIND)
        entry: dict[str, Any] = {
            "peer": i, "arch": archs[i], "recipient": recipient, "payload_bytes": len(payload),
            "envelope_bytes": len(env),
        }
        other = encode_state(_fresh_model(archs[i], ds, 1000 + i).state_dict())
        env_other = channel.seal(other, sender=i, recipient=recipient, round_index=_ROUND, kind=_KIND)
        entry["other_model_same_arch_envelope_bytes"] = len(env_other)
        entry["same_size_for_different_models"] = len(env_other) == len(env)
        entry["plaintext_uniformity_p"] = byte_uniformity_p_value(payload) if len(payload) >= 1280 else None
        if secure:
            assert isinstance(channel, NaClChannel)
            hdr = inspect_envelope(env)
            entry["visible_metadata"] = {
                "federation_tag": hdr.federation_tag.hex(), "round": hdr.round_index, "sender": hdr.sender,
                "recipient": hdr.recipient, "kind": hdr.kind, "padded": hdr.padded, "body_bytes": hdr.body_length,
            }
            body = env[HEADER_BYTES: HEADER_BYTES + hdr.body_length]
            p = byte_uniformity_p_value(body) if len(body) >= 1280 else None
            entry["ciphertext_uniformity_p"] = p
            if p is not None:
                cipher_p.append(p)
            again = channel.seal(payload, sender=i, recipient=recipient, round_index=_ROUND, kind=_KIND)
            b2 = again[HEADER_BYTES: HEADER_BYTES + hdr.body_length]
            entry["resealed_ciphertext_differs"] = bool(b2 != body)
            entry["resealed_bytes_equal_fraction"] = float(
                np.mean(np.frombuffer(body, np.uint8) == np.frombuffer(b2, np.uint8))) if len(b2) == len(body) else 0.0
            # attacker 1: knows the public directory, poses as the recipient with its own box key
            real = channel.directory
            impostor = PeerIdentity.generate(recipient)
            fake_dir = PeerDirectory(federation_id=fid, peers={**real.peers, recipient: impostor.public()})
            a1 = NaClChannel(keyring=KeyRing(directory=fake_dir, identities={recipient: impostor}),
                             max_message_bytes=crypto.max_message_bytes, pad_messages=crypto.pad_messages)
            r1 = _attempt(lambda: a1.open(env, sender=i, recipient=recipient, round_index=_ROUND, kind=_KIND))
            # attacker 2: a complete key ring of its own for the same federation id
            a2 = NaClChannel(keyring=generate_keys(n, fid), max_message_bytes=crypto.max_message_bytes,
                             pad_messages=crypto.pad_messages)
            r2 = _attempt(lambda: a2.open(env, sender=i, recipient=recipient, round_index=_ROUND, kind=_KIND))
            entry["attempts"] = [
                {"attacker": "public directory + own box key, posing as the recipient", **r1},
                {"attacker": "unrelated key ring for the same federation", **r2},
            ]
            opened_any |= r1["opened"] or r2["opened"]
        else:
            # no encryption: the "envelope" is the payload; decode it as any listener could
            try:
                decoded = decode_state(env, schema_of(state))
                same = all(torch.equal(decoded[k], state[k]) for k in state)
                entry["attempts"] = [{"attacker": "passive listener, no keys", "opened": True, "error": None,
                                      "crypto_error": False, "recovered_parameters": bool(same),
                                      "message": f"decoded all {sum(v.numel() for v in decoded.values())} parameters"}]
            except SecureDFMLError as exc:  # pragma: no cover - the plain channel is the identity
                entry["attempts"] = [{"attacker": "passive listener, no keys", "opened": False,
                                      "error": type(exc).__name__, "crypto_error": False, "message": str(exc)}]
            opened_any = True
        envelopes.append(entry)

    sizes = _size_table(cfg, ds, archs, wanted, crypto, fid, n, available_models(ds.kind))

    findings: list[Finding] = [finding(
        "warning",
        f"This run directory has no {CAPTURE}/ (written before traffic capture): the envelopes analysed here were "
        "re-sealed after the run from the peers' final models with fresh keys -- what the envelope format "
        "discloses, not the traffic that was sent. Run the federation again to analyse its captured traffic.",
    )]
    if not secure:
        findings.append(finding(
            "insecure",
            "crypto.channel = \"none\": an eavesdropper reads every model in clear (decoded "
            f"{len(envelopes)} of {len(envelopes)}). It can run every membership attack of the curious-aggregator "
            "threat model; audit that view too, and use crypto.channel = \"nacl\" for any deployment.",
        ))
    else:
        if opened_any:
            findings.append(finding("fail", "an attacker without the recipient's private key opened an envelope; "
                                            "the channel is broken."))
        else:
            kinds = sorted({a["error"] for e in envelopes for a in e["attempts"]})
            findings.append(finding(
                "note",
                f"An eavesdropper without keys opened none of {len(envelopes)} envelopes: every attempt failed with a "
                f"typed CryptoError ({', '.join(kinds)}). Posing as the recipient with its own key fails decryption; "
                "unrelated keys fail the sender's signature.",
            ))
        if cipher_p:
            pmin = min(cipher_p)
            thr = _ALPHA / len(cipher_p)
            if pmin < thr:
                findings.append(finding("warning", f"a ciphertext's byte histogram deviates from uniform (chi-square "
                                                   f"p = {pmin:.2g} < {thr:.2g}); investigate the envelope format."))
            else:
                findings.append(finding(
                    "note",
                    f"Ciphertext bytes are consistent with uniform (byte-histogram chi-square, smallest p = {pmin:.3f} "
                    f"over {len(cipher_p)} envelopes; plaintext payloads give p ~ "
                    f"{max((e['plaintext_uniformity_p'] or 0.0) for e in envelopes):.1g}): the bytes reveal nothing "
                    "about the weights.",
                ))
        if all(e.get("resealed_ciphertext_differs") for e in envelopes):
            findings.append(finding("note", "Sealing the same model twice gives different ciphertexts (fresh random "
                                            "nonce): repeated transmissions of one model cannot be linked by content."))
        findings.append(finding(
            "note",
            "Metadata in clear (authenticated, not encrypted): federation tag, round, sender, recipient, message kind "
            "and total size. Who talks to whom and when is visible to the eavesdropper.",
        ))
    if all(e["same_size_for_different_models"] for e in envelopes):
        findings.append(finding("note", "Two different models of one architecture give envelopes of identical size: "
                                        "sizes do not depend on the weights."))
    findings.extend(sizes.pop("_findings"))
    if cfg.crypto.secure_aggregation == "ckks":
        findings.append(finding("note", "CKKS secure averaging is on: CKKS ciphertexts also travel; their sizes depend "
                                        "only on the parameter count and the CKKS parameters, and their contents are "
                                        "encrypted (not analysed here)."))
    findings.append(finding(
        "note",
        "Measured on envelopes re-sealed with the run's channel settings and fresh ephemeral keys. This shows what "
        "the envelope format discloses; confidentiality itself rests on NaCl's security and on private keys "
        "staying private (see the threat model's assumptions), which no test can prove.",
    ))

    results: dict[str, Any] = {
        **results_header(run_dir, cfg, tm, fed),
        "status": "analysed",
        "source": "resealed",
        "source_description": (f"no {CAPTURE}/ in this (older) run directory: each peer's final model re-sealed "
                               "with the run's channel settings and fresh keys, not the traffic that was sent"),
        "channel": {"name": channel.name, "secure": secure, "description": description,
                    "keys": "ephemeral (generated for this analysis)"},
        "envelopes": envelopes,
        "sizes": sizes,
        "fail": bool(opened_any),
        "findings": by_severity(findings),
    }
    return results



def _size_table(cfg: RunConfig, ds: Any, archs: Sequence[str], wanted: Sequence[int], crypto: CryptoConfig, fid: str, n: int,
                zoo: Sequence[str]) -> dict[str, Any]:
    plain_ch, _ = build_channel(dataclasses.replace(crypto, pad_messages=False), federation_id=fid, num_peers=n) \
        if crypto.channel == "nacl" else (None, "")
    pad_ch, _ = build_channel(dataclasses.replace(crypto, pad_messages=True), federation_id=fid, num_peers=n) \
        if crypto.channel == "nacl" else (None, "")
    candidates = list(dict.fromkeys([*archs, *zoo]))
    table: dict[str, dict[str, Any]] = {}
    for k, arch in enumerate(candidates):
        try:
            m = _fresh_model(arch, ds, 7 + k)
        except SecureDFMLError as exc:
            _LOG.info("size table: skipping %s: %s", arch, exc)
            continue
        payload = len(encode_state(m.state_dict()))
        unpadded = plain_ch.envelope_size(payload) if plain_ch is not None else payload
        padded = pad_ch.envelope_size(payload) if pad_ch is not None else None
        table[arch] = {"parameters": int(count_parameters(m)), "payload_bytes": payload,
                       "envelope_bytes_unpadded": unpadded, "envelope_bytes_padded": padded,
                       "in_run": arch in archs}

    def candidates_for(size: int | None, key: str) -> list[str]:
        return sorted(a for a, row in table.items() if row[key] == size)

    peers_rows = []
    for i in wanted:
        row = table[archs[i]]
        cu = candidates_for(row["envelope_bytes_unpadded"], "envelope_bytes_unpadded")
        cp = candidates_for(row["envelope_bytes_padded"], "envelope_bytes_padded") if row["envelope_bytes_padded"] else cu
        peers_rows.append({"peer": i, "arch": archs[i], "envelope_bytes_unpadded": row["envelope_bytes_unpadded"],
                           "envelope_bytes_padded": row["envelope_bytes_padded"],
                           "architectures_with_this_size_unpadded": cu, "architectures_with_this_size_padded": cp,
                           "identified_unpadded": cu == [archs[i]], "identified_padded": cp == [archs[i]]})
    id_u = sum(r["identified_unpadded"] for r in peers_rows)
    id_p = sum(r["identified_padded"] for r in peers_rows)
    run_archs = sorted(set(archs[i] for i in wanted))
    findings: list[Finding] = []
    distinct_u = len({table[a]["envelope_bytes_unpadded"] for a in run_archs})
    findings.append(finding(
        "note",
        f"Without padding, the {len(run_archs)} architecture(s) of this run give {distinct_u} distinct envelope "
        f"size(s); knowing the public model zoo ({len(table)} architectures for {ds.kind} data), an eavesdropper "
        f"identifies the architecture of {id_u} of {len(peers_rows)} peers from sizes alone.",
    ))
    if crypto.channel == "nacl":
        buckets: dict[int, list[str]] = {}
        for a, row in table.items():
            buckets.setdefault(row["envelope_bytes_padded"], []).append(a)
        shared = ["/".join(sorted(v)) + f" ({k} bytes)" for k, v in sorted(buckets.items()) if len(v) > 1]
        findings.append(finding(
            "note",
            f"With crypto.pad_messages (power-of-two buckets), it identifies {id_p} of {len(peers_rows)}; "
            + (f"architectures sharing a bucket are indistinguishable: {'; '.join(shared)}." if shared else
               "no two architectures share a bucket here, so padding hides fine size differences but not the "
               "architecture (buckets differ by a factor of two)."),
        ))
        findings.append(finding("note", f"This run used pad_messages = {str(cfg.crypto.pad_messages).lower()}: the eavesdropper's "
                        f"view corresponds to the {'padded' if cfg.crypto.pad_messages else 'unpadded'} column."))
    return {"architectures": table, "peers": peers_rows, "identified_unpadded": id_u, "identified_padded": id_p,
            "run_pad_messages": cfg.crypto.pad_messages, "_findings": findings}


def _render(results: Mapping[str, Any], tm: ThreatModel) -> str:
    def fmt_p(p: Any) -> str:
        return "—" if p is None else f"{p:.3g}"

    def attempts_text(e: Mapping[str, Any]) -> str:
        return "; ".join(f"{a['attacker']}: {'OPENED' if a['opened'] else a['error']}" for a in e["attempts"])

    captured = results.get("source") == "capture"
    ch = results["channel"]
    body = [
        "<h2>Source</h2>",
        f"<p>{html.escape(str(results.get('source_description', '')))}</p>",
        "<h2>Channel</h2>",
        f"<p>{html.escape(ch['description'])} (keys: {html.escape(ch['keys'])}).</p>",
    ]
    if captured:
        tr = results["traffic"]
        kind_rows = [[k, v["messages"], v["bytes"], ", ".join(map(str, v["sizes"][:6])) + (" ..." if len(v["sizes"]) > 6
                      else ""), v["carries"]] for k, v in tr["by_kind"].items()]
        link_rows = [[lk["sender"], lk["recipient"], lk["messages"], lk["bytes"]] for lk in tr["links"]]
        round_rows = [[t, ", ".join(map(str, v["aggregators"])), ", ".join(map(str, v["senders"]))]
                      for t, v in tr["rounds"].items()]
        env_rows = [[e["file"], e["round"], e["sender"], e["recipient"], e["kind"], e.get("arch") or "",
                     e["envelope_bytes"], "" if not e.get("visible_metadata") else
                     ("yes" if e["visible_metadata"]["padded"] else "no"),
                     fmt_p(e.get("ciphertext_uniformity_p")), attempts_text(e)] for e in results["envelopes"][:_HTML_ROWS]]
        more = len(results["envelopes"]) - len(env_rows)
        cap_rows = [[r["arch"], r["kind"], r["messages"], ", ".join(map(str, r["observed_sizes"])), r["predicted_size"],
                     ", ".join(r["candidates"])] for r in results["sizes"].get("captured", [])]
        body += [
            "<h2>What the eavesdropper reads in clear</h2>",
            f"<p>{tr['messages']} messages, {tr['bytes']} bytes.</p>",
            html_table(["kind", "messages", "bytes", "envelope sizes", "carries"], kind_rows),
            "<h3>Who talks to whom</h3>",
            html_table(["sender", "recipient", "messages", "bytes"], link_rows),
            "<h3>Aggregators and senders per round, from the headers alone</h3>",
            html_table(["round", "aggregators", "senders"], round_rows),
            "<h2>Captured envelopes</h2>",
            html_table(["file", "round", "sender", "recipient", "kind", "arch", "bytes", "padded",
                        "ciphertext chi-square p", "opening attempts"], env_rows),
        ]
        if more > 0:
            body.append(f"<p>... and {more} more (all in results.json).</p>")
        body += [
            "<h2>Captured model messages: sizes on the wire</h2>",
            html_table(["architecture", "kind", "messages", "sizes seen", "predicted", "architectures of that size"],
                       cap_rows),
        ]
    else:
        env_rows = [[e["peer"], e["arch"], e["recipient"], e["payload_bytes"], e["envelope_bytes"],
                     e["other_model_same_arch_envelope_bytes"], fmt_p(e.get("ciphertext_uniformity_p")),
                     fmt_p(e.get("plaintext_uniformity_p")), attempts_text(e)] for e in results["envelopes"]]
        body += [
            "<h2>Re-sealed envelopes</h2>",
            html_table(["peer", "arch", "recipient", "payload bytes", "envelope bytes",
                        "envelope bytes, other model same arch", "ciphertext chi-square p", "plaintext chi-square p",
                        "opening attempts"], env_rows),
        ]
    size_rows = [[a, r["parameters"], r["payload_bytes"], r["envelope_bytes_unpadded"],
                  "—" if r["envelope_bytes_padded"] is None else r["envelope_bytes_padded"], "yes" if r["in_run"] else ""]
                 for a, r in results["sizes"]["architectures"].items()]
    peer_rows = [[r["peer"], r["arch"], ", ".join(r["architectures_with_this_size_unpadded"]),
                  ", ".join(r["architectures_with_this_size_padded"])] for r in results["sizes"]["peers"]]
    body += [
        "<h2>Envelope sizes per architecture</h2>",
        html_table(["architecture", "parameters", "payload bytes", "envelope bytes (no padding)",
                    "envelope bytes (padding)", "in this run"], size_rows),
        "<h2>Architecture inferred from size</h2>",
        html_table(["peer", "arch", "candidates, no padding", "candidates, padding"], peer_rows),
    ]
    return render_simple_html(f"Eavesdropper analysis: {tm.name}", tm, body, results["findings"])
