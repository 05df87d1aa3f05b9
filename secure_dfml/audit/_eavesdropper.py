"""What a passive eavesdropper learns from captured envelopes.

The eavesdropper holds no peer's private key. This analysis re-seals each
peer's final model exactly as the run's channel would (``crypto`` settings of
the run's config, fresh ephemeral keys) and measures, on those envelopes:

* **confidentiality** -- an attacker who knows the public peer directory and
  holds its own keys cannot open any envelope: posing as the recipient with
  its own box key fails decryption (:class:`~secure_dfml.crypto.DecryptionError`),
  and a key ring of unrelated keys fails the sender's signature
  (:class:`~secure_dfml.crypto.BadSignatureError`); both are typed
  :class:`~secure_dfml.errors.CryptoError` s;
* **indistinguishability of contents** -- two different models of one
  architecture give envelopes of identical size; re-sealing one model gives a
  different ciphertext (fresh nonce); the ciphertext's byte histogram is
  tested against the uniform distribution (chi-square p-value), next to the
  plaintext payload's for contrast;
* **what sizes reveal** -- envelope size per architecture with and without
  ``crypto.pad_messages``: without padding each architecture has its own size,
  so the eavesdropper learns which architecture a peer runs; with padding,
  architectures whose payloads fall into one size bucket are indistinguishable.

Header fields (federation tag, round, sender, recipient, message kind) travel
in clear (authenticated, not encrypted): they are listed as disclosed metadata.
With ``crypto.channel = "none"`` the eavesdropper simply decodes every model,
which this analysis demonstrates and flags.
"""

from __future__ import annotations

import dataclasses
import html
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

from secure_dfml.audit._federation import ModelTarget, load_model, rebuild_federation, results_header, selected_peers
from secure_dfml.audit._threat_models import ThreatModel
from secure_dfml.audit.report import Finding, by_severity, finding, html_table, render_simple_html
from secure_dfml.crypto import (
    HEADER_BYTES,
    KeyRing,
    NaClChannel,
    PeerDirectory,
    PeerIdentity,
    build_channel,
    decode_state,
    encode_state,
    generate_keys,
    inspect_envelope,
    schema_of,
)
from secure_dfml.errors import AuditError, CryptoError, SecureDFMLError
from secure_dfml.models import available_models, build_model, count_parameters

__all__ = ["analyse_envelopes", "byte_uniformity_p_value"]

_LOG = logging.getLogger(__name__)

_KIND = "model"
_ROUND = 0
_ALPHA = 1e-3  # family-wise level for the uniformity test (Bonferroni over envelopes)


def byte_uniformity_p_value(data: bytes) -> float:
    """Chi-square p-value of ``data``'s byte histogram against 256 equiprobable values.

    Near-uniform for ciphertext (p roughly uniform on [0, 1]); essentially 0
    for structured plaintext such as float tensors.
    """
    if len(data) < 256 * 5:
        raise AuditError(f"need at least {256 * 5} bytes for a byte-histogram chi-square test; got {len(data)}")
    counts = np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256)
    return float(stats.chisquare(counts).pvalue)


def _attempt(fn: Any) -> dict[str, Any]:
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
    run_dir: Path, cfg: Any, tm: ThreatModel, *, peers: Sequence[int] | None = None
) -> tuple[dict[str, Any], str]:
    """The eavesdropper analysis of a run: (results dict, self-contained HTML report)."""
    fed = rebuild_federation(cfg)
    ds = fed.dataset
    archs = [p.arch for p in fed.peers]
    n = len(archs)
    wanted = selected_peers(peers, n)
    mdir = run_dir / "models"
    if not mdir.is_dir():
        raise AuditError(f"{run_dir} has no models/ folder: the eavesdropper analysis seals the peers' final models")

    crypto = dataclasses.replace(cfg.crypto, keys_dir=None)  # ephemeral keys, never the run's key files
    channel, description = build_channel(crypto, federation_id=cfg.federation.id, num_peers=n)
    secure = bool(channel.secure)
    fid = cfg.federation.id

    envelopes: list[dict[str, Any]] = []
    cipher_p: list[float] = []
    opened_any = False
    for i in wanted:
        f = mdir / f"peer_{i:03d}_final.safetensors"
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

    findings: list[Finding] = []
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
        "channel": {"name": channel.name, "secure": secure, "description": description,
                    "keys": "ephemeral (generated for this analysis)"},
        "envelopes": envelopes,
        "sizes": sizes,
        "fail": bool(opened_any),
        "findings": by_severity(findings),
    }
    return results, _render(results, tm)


def _size_table(cfg: Any, ds: Any, archs: Sequence[str], wanted: Sequence[int], crypto: Any, fid: str, n: int,
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

    env_rows = []
    for e in results["envelopes"]:
        attempts = "; ".join(f"{a['attacker']}: {'OPENED' if a['opened'] else a['error']}" for a in e["attempts"])
        env_rows.append([e["peer"], e["arch"], e["recipient"], e["payload_bytes"], e["envelope_bytes"],
                         e["other_model_same_arch_envelope_bytes"], fmt_p(e.get("ciphertext_uniformity_p")),
                         fmt_p(e.get("plaintext_uniformity_p")), attempts])
    size_rows = [[a, r["parameters"], r["payload_bytes"], r["envelope_bytes_unpadded"],
                  "—" if r["envelope_bytes_padded"] is None else r["envelope_bytes_padded"], "yes" if r["in_run"] else ""]
                 for a, r in results["sizes"]["architectures"].items()]
    peer_rows = [[r["peer"], r["arch"], ", ".join(r["architectures_with_this_size_unpadded"]),
                  ", ".join(r["architectures_with_this_size_padded"])] for r in results["sizes"]["peers"]]
    ch = results["channel"]
    body = [
        "<h2>Channel</h2>",
        f"<p>{html.escape(ch['description'])} (keys: {html.escape(ch['keys'])}).</p>",
        "<h2>Captured envelopes</h2>",
        html_table(["peer", "arch", "recipient", "payload bytes", "envelope bytes",
                    "envelope bytes, other model same arch", "ciphertext chi-square p", "plaintext chi-square p",
                    "opening attempts"], env_rows),
        "<h2>Envelope sizes per architecture</h2>",
        html_table(["architecture", "parameters", "payload bytes", "envelope bytes (no padding)",
                    "envelope bytes (padding)", "in this run"], size_rows),
        "<h2>Architecture inferred from size</h2>",
        html_table(["peer", "arch", "candidates, no padding", "candidates, padding"], peer_rows),
    ]
    return render_simple_html(f"Eavesdropper analysis: {tm.name}", tm, body, results["findings"])
