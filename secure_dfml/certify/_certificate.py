"""Signed certificates: a run's privacy claims checked against requirements.

A certificate states an *upper bound* (each peer's ledger epsilon, recomputed
here from the ledger with its accountant and cross-checked with the other one)
*under the assumptions it lists*, reports membership-inference audits as
lower-bound evidence (never proof of privacy), and pins every artifact it
speaks about by sha256.  It is signed with the auditor's Ed25519 key over its
canonical JSON (sorted keys, no whitespace, every field but ``signature``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import stat
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nacl.encoding
import nacl.exceptions
import nacl.signing
import nacl.utils

from secure_dfml.certify._checks import check_run, group_sizes, ledger_files
from secure_dfml.certify._html import plot_series, render_html
from secure_dfml.certify._manifest import (
    MANIFEST,
    build_manifest,
    canonical_json,
    compare_files,
    hash_file,
    manifest_file,
    sha256_hex,
)
from secure_dfml.certify._requirements import Requirements
from secure_dfml.config import RunConfig
from secure_dfml.crypto import KeyFileError, write_key_file
from secure_dfml.errors import RunDirectoryError, SecureDFMLError
from secure_dfml.privacy import ADJACENCY, SECURE_LABEL, PrivacyLedger, compute_epsilon
from secure_dfml.rundir import (
    AUDIT,
    CANARY,
    CANARY_RESULTS,
    check_run_dir,
    read_config,
    read_metrics,
    read_summary,
)

__all__ = [
    "AUDITOR_KEY",
    "UpperBounds",
    "audit_binding_problem",
    "audit_upper_bounds",
    "canary_binding_problem",
    "AUDITOR_PUB",
    "CERTIFICATE",
    "CERTIFICATE_FORMAT",
    "CERTIFICATE_HTML",
    "CertificateError",
    "VerifyResult",
    "certify",
    "failed",
    "generate_auditor_key",
    "load_signing_key",
    "load_verify_key",
    "render_html",
    "verify",
    "write_auditor_key",
]

logger = logging.getLogger(__name__)

CERTIFICATE = "certificate.json"
CERTIFICATE_HTML = "certificate.html"
CERTIFICATE_FORMAT = "secure-dfml-certificate"
CERTIFICATE_VERSION = 1
AUDITOR_KEY = "auditor.key"
AUDITOR_PUB = "auditor.pub"
PASS, FAIL = "PASS", "FAIL"

AUDIT_STATEMENT = (
    "Membership-inference audits are lower-bound evidence: an attack that finds little shows only that these "
    "attacks found little, never that the models are private. The privacy claim is the ledger's upper bound "
    "under the assumptions listed; an audit's empirical epsilon lower bound above it is a FAIL."
)


class CertificateError(KeyFileError):
    """An auditor key or a certificate cannot be read or written."""


# ----------------------------------------------------------------------------- auditor keys
def generate_auditor_key() -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey.generate()


def write_auditor_key(out: str | Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """``out/auditor.key`` (the 32-byte Ed25519 seed as hex, one line, mode 0600)
    and ``out/auditor.pub`` (the verify key as hex, one line)."""
    out = Path(out)
    key_path, pub_path = out / AUDITOR_KEY, out / AUDITOR_PUB
    if not overwrite and (key_path.exists() or pub_path.exists()):
        raise CertificateError(f"{key_path} or {pub_path} already exists; pass --force to replace them")
    key = generate_auditor_key()
    try:
        write_key_file(key_path, (bytes(key).hex() + "\n").encode("ascii"), mode=0o600)
        write_key_file(pub_path, (bytes(key.verify_key).hex() + "\n").encode("ascii"), mode=0o644)
        os.chmod(pub_path, 0o644)
    except OSError as exc:
        raise CertificateError(f"cannot write the auditor key to {out}: {exc.strerror or exc}") from None
    return key_path, pub_path


def _read_hex_key(path: Path, what: str) -> bytes:
    try:
        text = Path(path).read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise CertificateError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CertificateError(f"{what} {path} cannot be read: {exc}") from None
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise CertificateError(f"{what} {path} must hold 64 hex digits (a 32-byte Ed25519 key, as `keys init --auditor` writes)")
    return raw


def load_signing_key(path: str | Path) -> nacl.signing.SigningKey:
    """The auditor's signing key; refused when other users can read the file."""
    path = Path(path)
    if os.name == "posix" and path.is_file() and stat.S_IMODE(path.stat().st_mode) & 0o077:
        raise CertificateError(f"auditor key {path} is readable by other users; run `chmod 600 {path}`")
    return nacl.signing.SigningKey(_read_hex_key(path, "auditor key"))


def load_verify_key(path: str | Path) -> nacl.signing.VerifyKey:
    return nacl.signing.VerifyKey(_read_hex_key(Path(path), "auditor public key"))


# ----------------------------------------------------------------------------- certify
def _req(name: str, status: str, reason: str, *, peer: int | None = None, **extra: Any) -> dict[str, Any]:
    return {"requirement": name, "peer": peer, "status": status, "reason": reason, **extra}


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _other(accountant: str) -> str:
    return "prv" if accountant == "rdp" else "rdp"


def _peer_epsilons(run_dir: Path) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for pid, path in ledger_files(run_dir).items():
        row: dict[str, Any] = {"peer": pid, "ledger": f"ledgers/{path.name}", "error": None}
        try:
            led = PrivacyLedger.load(path)
            row.update(accountant=led.accountant, delta=led.delta, target_epsilon=led.target_epsilon,
                       mechanisms=len(led.entries), recorded_epsilon=led.spent_epsilon)
            eps = {led.accountant: led.verify()}
            other = _other(led.accountant)
            try:
                eps[other] = compute_epsilon(led.mechanisms, delta=led.delta, accountant=other) if led.entries else 0.0
            except (SecureDFMLError, ValueError, ArithmeticError) as exc:  # PRV can fail on extreme histories
                row["cross_check_error"] = f"{other}: {exc}"
            row["epsilon"] = {k: _finite(v) for k, v in eps.items()}
        except SecureDFMLError as exc:
            row["error"] = str(exc)
        out[pid] = row
    return out


def _walk(obj: Any, owner: Any = None) -> Iterator[tuple[Any, float]]:
    """(data owner, value) for every numeric ``epsilon_lower_bound`` in an audit result."""
    if isinstance(obj, Mapping):
        owner = obj.get("data_owner", owner)
        for k, v in obj.items():
            if k == "epsilon_lower_bound" and isinstance(v, (int, float)) and not isinstance(v, bool):
                yield owner, float(v)
            else:
                yield from _walk(v, owner)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v, owner)


@dataclass(frozen=True)
class UpperBounds:
    """The largest upper confidence bounds over every (target, attack) of an audit:
    the AUC's, and the TPR's at one FPR level -- each (value, "target T / attack")
    -- and, for that level, every (target, attack) that could not measure it."""

    auc: tuple[float, str] | None
    tpr: tuple[float, str] | None
    unmeasured: tuple[str, ...]


def audit_upper_bounds(results: Mapping[str, Any], *, at_fpr: float | None = None) -> UpperBounds:
    """What requirements limit in an audit's results (``at_fpr``: the TPR level, if any)."""
    auc: tuple[float, str] | None = None
    tpr: tuple[float, str] | None = None
    unmeasured: list[str] = []
    for t in results.get("targets", []) or []:
        for attack, res in (t.get("attacks") or {}).items():
            where = f"target {t.get('target')} / {attack}"
            metrics = res.get("metrics") or {}
            hi = (metrics.get("auc") or {}).get("ci_high")
            if isinstance(hi, (int, float)) and (auc is None or hi > auc[0]):
                auc = (float(hi), where)
            if at_fpr is not None:
                est = (metrics.get("tpr_at_fpr") or {}).get(str(at_fpr)) or {}
                hi = est.get("ci_high")
                if isinstance(hi, (int, float)):
                    if tpr is None or hi > tpr[0]:
                        tpr = (float(hi), where)
                else:
                    unmeasured.append(f"{where}: {est.get('reason') or 'not reported'}")
    return UpperBounds(auc, tpr, tuple(unmeasured))


def audit_binding_problem(run_dir: Path, results: Mapping[str, Any]) -> str | None:
    """Why an audit's results do not belong to this run as it is now (None: they do).
    An audit names the run's id and the sha256 of its manifest when it ran."""
    manifest = manifest_file(run_dir)
    want = hash_file(manifest) if manifest.is_file() else None
    got = results.get("run_manifest_sha256")
    if got is None:
        return "does not name the run it audited (an audit from an older version)"
    if got != want:
        return "was made for another run, or before this run's artifacts changed (its run manifest sha256 differs)"
    return None


def canary_binding_problem(cfg: RunConfig, results: Any) -> str | None:
    """Why a canary audit's results are not evidence for a run of ``cfg`` (None: they are)."""
    if not isinstance(results, dict) or not isinstance(results.get("pooled"), dict):
        return "is from an older version without a pooled test and its strength"
    if results.get("config") != cfg.to_dict():
        return "audited another configuration than this run's config.toml"
    return None


def _read_results(run_dir: Path, tm: str) -> dict[str, Any] | None:
    path = run_dir / AUDIT / tm / "results.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunDirectoryError(f"{path} is unreadable: {exc}") from exc
    return data if isinstance(data, dict) else None


def _audit_requirements(
    run_dir: Path, req: Requirements, claimed: Mapping[int, float | None]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rows: list[dict[str, Any]] = []
    evidence: list[dict[str, Any]] = []
    audit_root = run_dir / AUDIT
    present = sorted(d.name for d in audit_root.iterdir() if (d / "results.json").is_file()) if audit_root.is_dir() else []
    for tm in req.audits.threat_models_required:
        if tm in present:
            rows.append(_req(f"audit {tm}", PASS, f"audit/{tm}/results.json present"))
        else:
            rows.append(_req(f"audit {tm}", FAIL, f"threat model {tm!r} not covered: no audit/{tm}/results.json "
                                                  f"(run `secure-dfml audit RUN --threat-model {tm}`)"))
    for tm in present:
        results = _read_results(run_dir, tm) or {}
        bound = audit_binding_problem(run_dir, results)
        if bound is not None:
            rows.append(_req(f"audit {tm} matches run", FAIL, f"audit/{tm}/results.json {bound}; run `secure-dfml "
                                                              f"audit RUN --threat-model {tm}` again"))
        limit = req.audits.limits.get(tm)
        bounds_ = audit_upper_bounds(results, at_fpr=None if limit is None else limit.at_fpr)
        worst_auc, worst_tpr, unmeasured = bounds_.auc, bounds_.tpr, list(bounds_.unmeasured)
        ev = {"threat_model": tm, "status": results.get("status"), "max_auc_upper_bound": None if worst_auc is None else worst_auc[0]}
        if results.get("status") == "view_absent":
            ev["max_epsilon_lower_bound"] = None
            evidence.append(ev)
            if limit is not None and (limit.max_auc is not None or limit.max_tpr is not None):
                rows.append(_req(f"audit {tm} limits", PASS, "nothing to attack: the adversary's view is absent from "
                                                             "this run (e.g. CKKS removed every individual model)"))
            continue
        if results.get("fail") is True:
            rows.append(_req(f"audit {tm} lower bound", FAIL, "the audit reports an empirical epsilon lower bound "
                                                              "above a ledger epsilon (results.json: fail = true)"))
        if limit is not None and limit.max_auc is not None:
            if worst_auc is None:
                rows.append(_req(f"audit {tm} AUC", FAIL, "no AUC in the audit results to compare with max_auc"))
            elif worst_auc[0] > limit.max_auc:
                rows.append(_req(f"audit {tm} AUC", FAIL, f"AUC upper confidence bound {worst_auc[0]:.3f} ({worst_auc[1]}) "
                                                          f"> max_auc {limit.max_auc:g}"))
            else:
                rows.append(_req(f"audit {tm} AUC", PASS, f"largest AUC upper confidence bound {worst_auc[0]:.3f} "
                                                          f"<= max_auc {limit.max_auc:g}"))
        if limit is not None and limit.max_tpr is not None:
            if worst_tpr is None:
                rows.append(_req(f"audit {tm} TPR", FAIL, f"TPR at FPR {limit.at_fpr:g} could not be measured: "
                                                          f"{'; '.join(unmeasured[:2]) or 'no results'}"))
            elif worst_tpr[0] > limit.max_tpr:
                rows.append(_req(f"audit {tm} TPR", FAIL, f"TPR upper confidence bound {worst_tpr[0]:.3f} at FPR "
                                                          f"{limit.at_fpr:g} ({worst_tpr[1]}) > max_tpr {limit.max_tpr:g}"))
            else:
                rows.append(_req(f"audit {tm} TPR", PASS, f"largest TPR upper confidence bound {worst_tpr[0]:.3f} at "
                                                          f"FPR {limit.at_fpr:g} <= max_tpr {limit.max_tpr:g}"))
        bounds = list(_walk(results.get("targets", [])))
        known = [v for v in claimed.values() if v is not None]
        best = max((b for _, b in bounds), default=None)
        ev["max_epsilon_lower_bound"] = best
        ev["attainable_epsilon"] = _mia_attainable(results)
        evidence.append(ev)
        for owner, lb in bounds:
            ceiling = claimed.get(int(owner)) if isinstance(owner, int) else (max(known) if known else None)
            if ceiling is not None and lb > ceiling * (1 + 1e-9):
                rows.append(_req(f"audit {tm} lower bound", FAIL,
                                 f"an empirical epsilon lower bound {lb:.3g} exceeds the ledger epsilon {ceiling:.3g}"
                                 f"{'' if owner is None else f' of peer {owner}'}: the accounting or its assumptions "
                                 "do not hold for this run",
                                 peer=owner if isinstance(owner, int) else None))
    return rows, evidence


def _mia_attainable(results: Mapping[str, Any]) -> float | None:
    """The largest epsilon lower bound a membership-inference audit could have
    reported (a perfect attack on the same counts; the audit records it per data owner)."""
    values = [float(p["attainable_epsilon"]) for p in (results.get("peers") or {}).values()
              if isinstance(p, Mapping) and isinstance(p.get("attainable_epsilon"), (int, float))]
    return max(values, default=None)


def _canary_requirements(
    run_dir: Path, cfg: RunConfig, req: Requirements, claimed: Mapping[int, float | None]
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The canary audit of this run's configuration (``audit/canary/canary.json``):
    its lower bound against the ledgers, and its strength against ``min_strength``."""
    path = run_dir / AUDIT / CANARY / CANARY_RESULTS
    rows: list[dict[str, Any]] = []
    need = req.audits.min_strength
    if not path.is_file():
        if need is not None:
            rows.append(_req("audit strength", FAIL, f"no canary audit: audit/{CANARY}/{CANARY_RESULTS} is missing "
                                                     f"(run `secure-dfml audit canary --run RUN`, or certify with "
                                                     f"--run-audits), so min_strength {need:g} is not shown"))
        return rows, None
    try:
        res = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunDirectoryError(f"{path} is unreadable: {exc}") from exc
    where = f"audit/{CANARY}/{CANARY_RESULTS}"
    problem = canary_binding_problem(cfg, res)
    if problem is not None:
        rows.append(_req("canary audit", FAIL, f"{where} {problem}; run the canary audit of this run again"))
        if not isinstance(res, dict) or not isinstance(res.get("pooled"), dict):
            return rows, None
    lb = float(res.get("epsilon_lower_bound") or 0.0)
    attainable = float(res.get("attainable_epsilon") or 0.0)
    ev = {"threat_model": CANARY, "status": "audited", "canaries": res["pooled"].get("canaries"),
          "max_epsilon_lower_bound": lb, "attainable_epsilon": attainable, "max_auc_upper_bound": None,
          "note": "a separate training run of this configuration with canaries (evidence about the implementation "
                  "and its accounting under this configuration, not about the released models)"}
    known = [v for v in claimed.values() if v is not None]
    if res.get("fail") is True:
        rows.append(_req("canary audit lower bound", FAIL, "the canary audit's lower bound exceeds its own run's "
                                                           "ledger epsilon (canary.json: fail = true)"))
    elif known and lb > max(known) * (1 + 1e-9):
        rows.append(_req("canary audit lower bound", FAIL, f"canary lower bound {lb:.3g} exceeds the largest ledger "
                                                           f"epsilon {max(known):.3g}"))
    else:
        rows.append(_req("canary audit lower bound", PASS, f"largest canary lower bound {lb:.3g} does not exceed a "
                                                           "ledger epsilon"))
    if need is not None:
        ok = attainable >= need
        rows.append(_req("audit strength", PASS if ok else FAIL,
                         f"the canary audit could show at most eps >= {attainable:.3g} ({ev['canaries']} canaries) "
                         + (f">= min_strength {need:g}" if ok else
                            f"< min_strength {need:g}: audit too weak; raise --canaries")))
    return rows, ev


def _assumptions(summary: Mapping[str, Any], peers: Mapping[int, Mapping[str, Any]], versions: Mapping[str, Any]) -> list[str]:
    accountants = sorted({str(p.get("accountant")) for p in peers.values() if p.get("accountant")})
    label = str(summary.get("privacy_label", ""))
    rng = ("secure mode: " + SECURE_LABEL) if SECURE_LABEL in label else (
        "research-grade: DP noise and sampling come from a seeded RNG (reproducible, NOT for deployment); "
        "anyone who knows the seed can remove the noise")
    return [
        (
            "Poisson sampling: every DP-SGD batch includes each record independently with probability batch/n "
            "(the rate the ledger records)."
        ),
        (
            "Per-sample clipping of the whole loss: each record's gradient of the entire training loss "
            "(including any mutual-learning term) is clipped to the configured norm before noise is added."
        ),
        (
            "Every release (models sent, returned, published, peak snapshots, metrics) is post-processing of "
            "DP-SGD outputs and of the public data; nothing else reads a peer's private records."
        ),
        f"Neighbouring relation: {ADJACENCY}.",
        (
            f"Accountant(s): {', '.join(accountants) or 'none'} (Opacus {versions.get('opacus')}), cross-checked with the "
            "other accountant; secure_dfml " + str(versions.get("secure-dfml")) + "."
        ),
        f"Randomness: {rng}.",
        (
            "The run was executed by the code and packages the manifest names; the certificate checks the artifacts "
            "are mutually consistent and unchanged, not that the training process was honest."
        ),
    ]


def certify(
    run_dir: str | Path, requirements: Requirements, signing_key: nacl.signing.SigningKey, *, write: bool = True
) -> dict[str, Any]:
    """Check ``run_dir`` against ``requirements``, sign the verdict, and (``write``)
    save ``certificate.json`` and ``certificate.html`` in the run directory."""
    run_dir = check_run_dir(run_dir)
    cfg = read_config(run_dir)
    summary = read_summary(run_dir) or {}
    metrics = read_metrics(run_dir)
    findings = check_run(run_dir)
    errors = [f for f in findings if f.severity == "error"]
    rows: list[dict[str, Any]] = []
    if errors:
        rows.append(_req("run integrity", FAIL, "; ".join(f"{f.artifact}: {f.problem} [{f.check}]" for f in errors)))
    else:
        rows.append(_req("run integrity", PASS, "manifest hashes and cross-checks of config, metrics, summary and "
                                                "ledgers agree"))
    private = cfg.privacy.enabled and bool(summary.get("private", cfg.privacy.enabled))
    rows.append(_req("private run", PASS if private else FAIL,
                     "DP-SGD with per-peer ledgers" if private else "the run is not differentially private "
                     "(privacy.enabled = false): a non-private run is never certified"))
    peers = _peer_epsilons(run_dir) if private else {}
    pr = requirements.privacy
    claimed: dict[int, float | None] = {}
    for pid in range(cfg.federation.peers):
        row = peers.get(pid)
        if not private:
            break
        if row is None or row.get("error"):
            rows.append(_req("ledger", FAIL, f"peer {pid}: " + ("no ledger" if row is None else row["error"]), peer=pid))
            claimed[pid] = None
            continue
        accountant = pr.accountant or row["accountant"]
        eps = row["epsilon"].get(accountant)
        row["claimed_accountant"] = accountant
        row["claimed_epsilon"] = eps
        row["max_epsilon"] = pr.max_epsilon_for(pid)
        claimed[pid] = row["epsilon"].get(row["accountant"])
        limit = pr.max_epsilon_for(pid)
        if limit is not None:
            if eps is None:
                rows.append(_req("max_epsilon", FAIL, f"peer {pid}: epsilon with the {accountant} accountant could "
                                                      f"not be computed ({row.get('cross_check_error')})", peer=pid))
            elif eps > limit:
                rows.append(_req("max_epsilon", FAIL, f"peer {pid}: epsilon {eps:.4g} ({accountant}) is above the "
                                                      f"limit {limit:g}", peer=pid))
            else:
                rows.append(_req("max_epsilon", PASS, f"peer {pid}: epsilon {eps:.4g} ({accountant}) <= {limit:g}", peer=pid))
        if pr.delta is not None:
            ok = row["delta"] <= pr.delta
            rows.append(_req("delta", PASS if ok else FAIL,
                             f"peer {pid}: delta {row['delta']:g} {'<=' if ok else '>'} {pr.delta:g}", peer=pid))
    if pr.secure_mode_required:
        secure = cfg.privacy.secure_mode and SECURE_LABEL in str(summary.get("privacy_label", ""))
        rows.append(_req("secure_mode", PASS if secure else FAIL,
                         "DP noise and sampling from the OS CSPRNG" if secure else
                         "secure_mode missing: the run used research-grade seeded randomness (privacy.secure_mode = false)"))
    ex = requirements.exchange
    if ex.channel_encryption_required:
        ok = cfg.crypto.channel == "nacl" and summary.get("channel") == "nacl" and bool(summary.get("channel_secure"))
        rows.append(_req("channel encryption", PASS if ok else FAIL,
                         "NaCl authenticated encryption on every message" if ok else
                         f"channel {summary.get('channel', cfg.crypto.channel)!r}: models were sent without encryption"))
    if ex.secure_aggregation_required:
        ok = cfg.crypto.secure_aggregation == "ckks" and summary.get("secure_aggregation", "ckks") == "ckks"
        rows.append(_req("secure aggregation", PASS if ok else FAIL,
                         "CKKS: aggregators see only encrypted sums" if ok else
                         f"secure_aggregation = {cfg.crypto.secure_aggregation!r}: aggregators see individual models"))
    sizes = group_sizes(metrics)
    if ex.min_group_size is not None:
        if not sizes:
            rows.append(_req("min_group_size", FAIL, "metrics.jsonl records no aggregation group"))
        else:
            rnd, agg, smallest = min(sizes, key=lambda t: t[2])
            ok = smallest >= ex.min_group_size
            rows.append(_req("min_group_size", PASS if ok else FAIL,
                             f"smallest group: {smallest} sender model(s) (round {rnd}, aggregator {agg}) "
                             f"{'>=' if ok else '<'} {ex.min_group_size}"))
    audit_rows, evidence = _audit_requirements(run_dir, requirements, claimed)
    rows += audit_rows
    canary_rows, canary_ev = _canary_requirements(run_dir, cfg, requirements, claimed)
    rows += canary_rows
    if canary_ev is not None:
        evidence.append(canary_ev)
    manifest = build_manifest(run_dir, include_manifest=True)
    run_manifest = manifest_file(run_dir)
    certified = all(r["status"] == PASS for r in rows)
    body: dict[str, Any] = {
        "format": CERTIFICATE_FORMAT,
        "version": CERTIFICATE_VERSION,
        "issued": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "run_dir": str(run_dir),
        "run_id": summary.get("run_id"),
        "verdict": "CERTIFIED" if certified else "NOT CERTIFIED",
        "certified": certified,
        "requirements": requirements.to_dict(),
        "results": rows,
        "peers": [peers[k] for k in sorted(peers)],
        "deployment": {
            "channel": summary.get("channel", cfg.crypto.channel),
            "secure_aggregation": cfg.crypto.secure_aggregation,
            "smallest_group": min((s for *_, s in sizes), default=None),
            "privacy_label": summary.get("privacy_label"),
            "secure_mode": cfg.privacy.secure_mode,
        },
        "findings": [f.to_dict() for f in findings],
        "assumptions": _assumptions(summary, peers, manifest["packages"]),
        "audit_statement": AUDIT_STATEMENT,
        "audit_evidence": evidence,
        "plots": plot_series(run_dir, [peers[k] for k in sorted(peers)], summary.get("run_id")),
        "run_manifest_sha256": hash_file(run_manifest) if run_manifest.is_file() else None,
        "manifest_sha256": sha256_hex(canonical_json(manifest)),
        "manifest": manifest,
    }
    cert = {**body, "signature": {
        "algorithm": "ed25519",
        "public_key": bytes(signing_key.verify_key).hex(),
        "covers": "canonical JSON (sorted keys, no whitespace, UTF-8) of every field but 'signature'",
        "value": signing_key.sign(canonical_json(body)).signature.hex(),
    }}
    if write:
        _write_text(run_dir / CERTIFICATE, json.dumps(cert, indent=2, sort_keys=True) + "\n")
        _write_text(run_dir / CERTIFICATE_HTML, render_html(cert))
    logger.info("certificate for %s: %s", run_dir, cert["verdict"])
    return cert


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- verify
@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    problems: tuple[str, ...] = ()
    verdict: str | None = None
    checked_files: int = 0
    certificate: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": list(self.problems), "verdict": self.verdict,
                "checked_files": self.checked_files}


def verify(
    certificate_path: str | Path, public_key_path: str | Path, run_dir: str | Path | None = None
) -> VerifyResult:
    """Check a certificate's signature with the auditor's public key and, with
    ``run_dir``, re-hash every artifact it lists.  A missing certificate or key
    raises :class:`CertificateError`; everything else is a problem in the result."""
    key = load_verify_key(public_key_path)
    path = Path(certificate_path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CertificateError(f"certificate {path} cannot be read: {exc.strerror or exc}") from None
    try:
        cert = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return VerifyResult(False, (f"{path} is not a readable certificate (changed or corrupted): {exc}",))
    if not isinstance(cert, dict) or cert.get("format") != CERTIFICATE_FORMAT or not isinstance(cert.get("signature"), dict):
        return VerifyResult(False, (f"{path} is not a secure-dfml certificate",))
    problems: list[str] = []
    sig = cert["signature"]
    body = {k: v for k, v in cert.items() if k != "signature"}
    if sig.get("public_key") != bytes(key).hex():
        problems.append(f"the certificate names signing key {sig.get('public_key')!r}, not the given public key "
                        f"{bytes(key).hex()}")
    try:
        key.verify(canonical_json(body), bytes.fromhex(str(sig.get("value", ""))))
    except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
        problems.append("the signature does not match the certificate's content: the certificate was changed "
                        "after signing, or signed by another key")
    manifest = cert.get("manifest") if isinstance(cert.get("manifest"), dict) else {}
    if sha256_hex(canonical_json(manifest)) != cert.get("manifest_sha256"):
        problems.append("manifest_sha256 does not match the embedded manifest")
    files = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
    checked = 0
    if run_dir is not None:
        run = Path(run_dir)
        if not run.is_dir():
            raise CertificateError(f"run directory {run} does not exist")
        diff = compare_files(run, files)
        checked = len(files)
        problems += [f"{rel}: changed since the certificate was issued (sha256 differs)" for rel in diff.changed]
        problems += [f"{rel}: missing (the certificate covers it)" for rel in diff.missing]
        problems += [f"{rel}: added after the certificate was issued (not covered)" for rel in diff.added]
        if (run / MANIFEST).is_file() and MANIFEST not in files:
            problems.append(f"{MANIFEST}: added after the certificate was issued (not covered)")
    return VerifyResult(not problems, tuple(problems), cert.get("verdict"), checked, cert)


def failed(results: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in results if r["status"] == FAIL]

