"""Cross-checks of a run directory: do its artifacts agree with each other and
with the manifest the run wrote?

Each problem is a :class:`Finding` naming the artifact, the check and what is
wrong.  ``severity = "error"`` means the run's claims cannot be trusted as they
stand (tampering, or an inconsistency no honest run produces): a certificate is
refused.  ``"warning"`` and ``"info"`` are reported and do not block.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from secure_dfml.certify._manifest import MANIFEST, compare_files, read_manifest
from secure_dfml.config import RunConfig
from secure_dfml.errors import SecureDFMLError
from secure_dfml.privacy import PrivacyLedger, resolve_budget
from secure_dfml.rundir import (
    AUDIT,
    CONFIG,
    LEDGERS,
    METRICS,
    SUMMARY,
    VIEW_RECEIVED,
    check_run_dir,
    ledgers_dir,
    read_config,
    read_metrics,
    read_summary,
    views_dir,
)

__all__ = ["CHECKS", "SEVERITIES", "Finding", "check_run", "group_sizes", "ledger_files"]

logger = logging.getLogger(__name__)

SEVERITIES = ("error", "warning", "info")
#: Every check by name (a finding's ``check``).
CHECKS = {
    "manifest-missing": "the run directory has no manifest.json",
    "manifest-hash": "a file's sha256 differs from manifest.json",
    "manifest-removed": "a file listed in manifest.json is gone",
    "manifest-added": "an artifact is present that manifest.json does not list",
    "ledger-unreadable": "a ledger file is not JSON",
    "ledger-peer-id": "a ledger's file name names another peer than its peer_id",
    "ledger-missing": "a peer of the config has no ledger",
    "ledger-extra": "a ledger for a peer the config does not have",
    "ledger-budget": "a ledger's delta or target differs from what the config resolves for that peer",
    "ledger-chain": "a ledger fails to load (hash chain, head hash, or epsilon recomputation)",
    "ledger-delta": "a ledger's delta is invalid or >= 1/n",
    "ledger-vs-metrics": "a ledger's mechanisms disagree with the phases metrics.jsonl records",
    "secure-aggregation": "config.toml's secure_aggregation disagrees with what metrics and views show",
    "channel": "config.toml's channel disagrees with summary.json",
    "privacy": "config.toml's privacy setting disagrees with summary.json",
}

_LEDGER_NAME = re.compile(r"^peer_(\d+)\.json$")
_SIGMA_RTOL = 1e-9


@dataclass(frozen=True)
class Finding:
    """One problem: which artifact, which check (:data:`CHECKS`), what is wrong."""

    artifact: str
    check: str
    problem: str
    severity: str = "error"

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity {self.severity!r} is not one of {', '.join(SEVERITIES)}")
        if self.check not in CHECKS:
            raise ValueError(f"check {self.check!r} is not one of {', '.join(CHECKS)}")

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.severity}: {self.artifact}: {self.problem} [{self.check}]"


def ledger_files(run_dir: str | Path) -> dict[int, Path]:
    """Peer id (from the file name) -> ledger file."""
    root = ledgers_dir(run_dir)
    out: dict[int, Path] = {}
    if root.is_dir():
        for p in sorted(root.iterdir()):
            m = _LEDGER_NAME.match(p.name)
            if m and p.is_file():
                out[int(m.group(1))] = p
    return out


def group_sizes(metrics: Sequence[Mapping[str, Any]]) -> list[tuple[int, int, int]]:
    """(round, aggregator, size) for every group in which at least one sender's
    model reached the aggregator: the contributors of each CKKS sum (each sum is
    one size), else the number of models received individually."""
    out: list[tuple[int, int, int]] = []
    for rec in metrics:
        for g in rec.get("groups", []) or []:
            sums = g.get("secure_sums") or []
            agg = int(g.get("aggregator", -1))
            if sums:
                out += [(int(rec.get("round", -1)), agg, len(s.get("contributors", []))) for s in sums]
            elif g.get("received"):
                out.append((int(rec.get("round", -1)), agg, len(g["received"])))
    return [t for t in out if t[2] > 0]


def check_run(run_dir: str | Path) -> list[Finding]:
    """Every inconsistency found in ``run_dir`` (empty: none found).  A run
    directory that cannot be read at all raises :class:`RunDirectoryError`."""
    run_dir = check_run_dir(run_dir)
    cfg = read_config(run_dir)
    summary = read_summary(run_dir) or {}
    metrics = read_metrics(run_dir)
    findings: list[Finding] = []
    findings += _check_manifest(run_dir)
    findings += _check_exchange(run_dir, cfg, summary, metrics)
    findings += _check_ledgers(run_dir, cfg, summary, metrics)
    for f in findings:
        logger.info("check_run %s: %s", run_dir, f)
    return findings


# ----------------------------------------------------------------------------- manifest
def _check_manifest(run_dir: Path) -> list[Finding]:
    manifest = read_manifest(run_dir)
    if manifest is None:
        return [Finding(MANIFEST, "manifest-missing",
                        "no manifest.json: the artifacts cannot be checked against what the run wrote")]
    diff = compare_files(run_dir, manifest["files"])
    out = [Finding(rel, "manifest-hash", f"{rel} differs from the sha256 manifest.json records for it")
           for rel in diff.changed]
    out += [Finding(rel, "manifest-removed", f"{rel} is listed in manifest.json but no longer exists")
            for rel in diff.missing]
    for rel in diff.added:
        if rel.startswith(f"{AUDIT}/"):
            out.append(Finding(rel, "manifest-added",
                               f"{rel} was written after the run (audit results): not in the run's manifest, "
                               "hashed by a certificate when one is issued", "info"))
        else:
            out.append(Finding(rel, "manifest-added", f"{rel} is not listed in manifest.json: added after the run"))
    return out


# ----------------------------------------------------------------------------- exchange
def _check_exchange(
    run_dir: Path, cfg: RunConfig, summary: Mapping[str, Any], metrics: Sequence[Mapping[str, Any]]
) -> list[Finding]:
    out: list[Finding] = []
    channel = summary.get("channel")
    if channel is not None and channel != cfg.crypto.channel:
        out.append(Finding(CONFIG, "channel", f"config.toml says crypto.channel = {cfg.crypto.channel!r} but "
                                              f"summary.json says the run used {channel!r}"))
    if summary.get("channel_secure") is not None and bool(summary["channel_secure"]) != (cfg.crypto.channel == "nacl"):
        out.append(Finding(SUMMARY, "channel", f"summary.json says channel_secure = {summary['channel_secure']} "
                                               f"for crypto.channel = {cfg.crypto.channel!r}"))
    if "private" in summary and bool(summary["private"]) != cfg.privacy.enabled:
        out.append(Finding(CONFIG, "privacy", f"config.toml says privacy.enabled = {cfg.privacy.enabled} but "
                                              f"summary.json says private = {summary['private']}"))
    mode = cfg.crypto.secure_aggregation
    if summary.get("secure_aggregation") not in (None, mode):
        out.append(Finding(CONFIG, "secure-aggregation",
                           f"config.toml says secure_aggregation = {mode!r} but summary.json says "
                           f"{summary.get('secure_aggregation')!r}"))
    groups = [(int(r.get("round", -1)), g) for r in metrics for g in (r.get("groups") or [])]
    individual = [(rnd, g) for rnd, g in groups if g.get("received")]
    summed = [(rnd, g) for rnd, g in groups if g.get("secure_sums")]
    received_dir = views_dir(run_dir, VIEW_RECEIVED)
    has_received = received_dir.is_dir() and any(received_dir.iterdir())
    if mode == "ckks":
        if individual:
            rnd, g = individual[0]
            out.append(Finding(METRICS, "secure-aggregation",
                               f"config.toml says secure_aggregation = \"ckks\" but metrics.jsonl shows aggregator "
                               f"{g.get('aggregator')} received individual models {g.get('received')} in round {rnd} "
                               f"({len(individual)} group(s) in all)"))
        if groups and not summed:
            out.append(Finding(METRICS, "secure-aggregation",
                               "config.toml says secure_aggregation = \"ckks\" but metrics.jsonl records no secure sum"))
        if has_received:
            out.append(Finding("views/received", "secure-aggregation",
                               "views/received holds individual models although secure_aggregation = \"ckks\" "
                               "(an aggregator sees only encrypted sums)"))
    else:
        if summed:
            rnd, g = summed[0]
            out.append(Finding(METRICS, "secure-aggregation",
                               f"config.toml says secure_aggregation = {mode!r} but metrics.jsonl records CKKS "
                               f"secure sums (round {rnd}, aggregator {g.get('aggregator')})"))
        if individual and not has_received:
            out.append(Finding("views/received", "secure-aggregation",
                               "metrics.jsonl shows aggregators received individual models but views/received "
                               "is missing or empty"))
    return out


# ----------------------------------------------------------------------------- ledgers
def _check_ledgers(
    run_dir: Path, cfg: RunConfig, summary: Mapping[str, Any], metrics: Sequence[Mapping[str, Any]]
) -> list[Finding]:
    files = ledger_files(run_dir)
    if not cfg.privacy.enabled:
        return [Finding(f"{LEDGERS}/{p.name}", "ledger-extra",
                        f"{p.name} exists although config.toml says privacy.enabled = false", "warning")
                for p in files.values()]
    out: list[Finding] = []
    n_peers = cfg.federation.peers
    sizes = [int(x) for x in summary.get("train_samples_per_peer", []) or []]
    for pid in range(n_peers):
        if pid not in files:
            out.append(Finding(f"{LEDGERS}/peer_{pid}.json", "ledger-missing",
                               f"peer {pid} of {n_peers} has no ledger: its spent budget is unaccounted"))
    for pid, path in files.items():
        if pid >= n_peers:
            out.append(Finding(f"{LEDGERS}/{path.name}", "ledger-extra",
                               f"{path.name} is a ledger for peer {pid} but config.toml has {n_peers} peers "
                               f"(ids 0..{n_peers - 1})"))
    phases = _metrics_phases(metrics)
    for pid, path in files.items():
        out += _check_ledger(pid, path, cfg, sizes, phases, str(summary.get("run_id", "")))
    return out


def _metrics_phases(metrics: Sequence[Mapping[str, Any]]) -> dict[int, list[tuple[int, str, float]]]:
    by_peer: dict[int, list[tuple[int, str, float]]] = {}
    for rec in metrics:
        for ph in rec.get("phases", []) or []:
            if ph.get("ran") and ph.get("noise_multiplier") is not None:
                by_peer.setdefault(int(ph["peer"]), []).append(
                    (int(rec.get("round", -1)), str(ph.get("phase")), float(ph["noise_multiplier"])))
    return by_peer


def _check_ledger(
    pid: int,
    path: Path,
    cfg: RunConfig,
    sizes: Sequence[int],
    phases: Mapping[int, Sequence[tuple[int, str, float]]],
    run_id: str,
) -> list[Finding]:
    art = f"{LEDGERS}/{path.name}"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise ValueError(f"holds {type(raw).__name__}, not a JSON object")  # noqa: TRY004 -- caught below
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return [Finding(art, "ledger-unreadable", f"{path.name} cannot be read: {exc}")]
    out: list[Finding] = []
    if raw.get("peer_id") != pid:
        out.append(Finding(art, "ledger-peer-id",
                           f"{path.name} is named for peer {pid} but holds the ledger of peer_id {raw.get('peer_id')!r} "
                           "(copied over another peer's?)"))
    n = sizes[pid] if pid < len(sizes) else None
    delta = raw.get("delta")
    if not isinstance(delta, (int, float)) or isinstance(delta, bool) or not 0 < delta < 1:
        out.append(Finding(art, "ledger-delta", f"{path.name} has delta = {delta!r}: expected a number in (0, 1)"))
    elif n is not None and delta >= 1.0 / n:
        out.append(Finding(art, "ledger-delta",
                           f"{path.name} has delta = {delta:g} >= 1/n = {1.0 / n:.3g} (peer {pid} has {n} training "
                           "samples): such a guarantee allows publishing whole records; refused"))
    if n is not None:
        try:
            budget = resolve_budget(cfg.privacy, pid, n)
        except SecureDFMLError as exc:
            out.append(Finding(CONFIG, "ledger-budget", f"the config's budget for peer {pid} is invalid: {exc}"))
        else:
            if isinstance(delta, (int, float)) and not math.isclose(float(delta), budget.delta, rel_tol=1e-9):
                out.append(Finding(art, "ledger-budget", f"{path.name} has delta = {delta!r} but config.toml resolves "
                                                         f"delta = {budget.delta:g} for peer {pid}"))
            target = raw.get("target_epsilon")
            if budget.epsilon is None:
                if target is not None:
                    out.append(Finding(art, "ledger-budget", f"{path.name} has target_epsilon = {target!r} but "
                                                             f"config.toml sets no epsilon for peer {pid}"))
            elif not isinstance(target, (int, float)) or not math.isclose(float(target), budget.epsilon, rel_tol=1e-9):
                out.append(Finding(art, "ledger-budget", f"{path.name} has target_epsilon = {target!r} but "
                                                         f"config.toml resolves epsilon = {budget.epsilon:g} for peer {pid}"))
    try:
        PrivacyLedger.load(path)
    except SecureDFMLError as exc:
        out.append(Finding(art, "ledger-chain", str(exc)))
    entries = raw.get("entries") if isinstance(raw.get("entries"), list) else []
    recorded: list[tuple[int, str, float, str]] = []
    for e in entries:
        try:
            recorded.append((int(e["round"]), str(e["phase"]), float(e["noise_multiplier"]), str(e.get("run", ""))))
        except (KeyError, TypeError, ValueError):
            out.append(Finding(art, "ledger-chain", f"{path.name} has a malformed entry: {e!r:.120}"))
    for rnd, phase, sigma in phases.get(pid, []):
        if not any(r == rnd and p == phase and math.isclose(s, sigma, rel_tol=_SIGMA_RTOL) for r, p, s, _ in recorded):
            near = [s for r, p, s, _ in recorded if r == rnd and p == phase]
            what = f"records noise multiplier {near[0]:.6g}" if near else "has no such entry"
            out.append(Finding(art, "ledger-vs-metrics",
                               f"metrics.jsonl says peer {pid} ran its {phase} phase of round {rnd} with noise "
                               f"multiplier {sigma:.6g}; {path.name} {what}"))
    if run_id:
        ran = {(r, p) for r, p, _ in phases.get(pid, [])}
        for r, p, s, run in recorded:
            if run == run_id and p != "class_prior" and (r, p) not in ran:
                out.append(Finding(art, "ledger-vs-metrics",
                                   f"{path.name} charges a {p} phase in round {r} (noise multiplier {s:.6g}) that "
                                   "metrics.jsonl does not record as run"))
    return out
