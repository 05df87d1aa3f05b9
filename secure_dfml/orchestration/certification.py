"""Certification with the audits it needs, and the whole job in one call.

:func:`secure_dfml.certify.certify` only reads evidence. Here, before it is
called, every threat model the requirements list that has no audit in the run
directory is audited (:func:`secure_dfml.audit.audit_run_dir`), and when the
requirements ask for an audit strength (``[audits] min_strength``) and the run
has no canary audit strong enough, one is trained with as few canaries per peer
as reach that strength (:func:`canaries_for_strength`). Audits already present
are reused as they are: they are hashed into the certificate like every other
artifact. :func:`run_pipeline` is the README's one command: train, audit,
certify and verify.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nacl.signing
import numpy as np

from secure_dfml._run import run_federation
from secure_dfml.audit import audit_run_dir, canary_k_grid, one_run_attainable
from secure_dfml.certify import (
    AUDITOR_KEY,
    AUDITOR_PUB,
    CERTIFICATE,
    CERTIFICATE_HTML,
    Requirements,
    VerifyResult,
    audit_binding_problem,
    canary_binding_problem,
    certify,
    load_signing_key,
    verify,
    write_auditor_key,
)
from secure_dfml.config import RunConfig
from secure_dfml.errors import AuditError, ConfigError
from secure_dfml.orchestration.canary import canary_dir, run_canary_audit, run_state_root
from secure_dfml.privacy import default_delta
from secure_dfml.rundir import (
    AUDIT,
    CANARY_RESULTS,
    SUMMARY,
    check_run_dir,
    read_config,
)

__all__ = [
    "CANARY_LADDER",
    "AuditStep",
    "PipelineResult",
    "canaries_for_strength",
    "certify_with_audits",
    "missing_audits",
    "run_pipeline",
]

_LOG = logging.getLogger(__name__)

#: Canaries per peer tried, smallest first, to reach a required audit strength.
CANARY_LADDER = (100, 200, 500, 1000)


@dataclass(frozen=True)
class AuditStep:
    """One audit certification needs: a threat model, or the canary audit."""

    kind: str  # "threat-model" or "canary"
    name: str
    reason: str
    canaries_per_peer: int | None = None


def canaries_for_strength(strength: float, peers: int, *, confidence: float = 0.95, delta: float = 0.0) -> int:
    """The fewest canaries per peer (from :data:`CANARY_LADDER`) whose pooled
    one-run audit can show an epsilon lower bound of at least ``strength``."""
    for m in CANARY_LADDER:
        total = peers * m
        k_pos, k_neg = canary_k_grid(total)
        if one_run_attainable(total, k_pos=k_pos, k_neg=k_neg, confidence=confidence, delta=delta) >= strength:
            return m
    top = CANARY_LADDER[-1] * peers
    k_pos, k_neg = canary_k_grid(top)
    best = one_run_attainable(top, k_pos=k_pos, k_neg=k_neg, confidence=confidence, delta=delta)
    raise AuditError(f"no canary audit of {peers} peers can show eps >= {strength:g} ({CANARY_LADDER[-1]} canaries "
                     f"per peer reach at most {best:.3g}); lower [audits] min_strength")


def _canary_strength(run_dir: Path) -> float | None:
    """The attainable bound of the run's canary audit; None when there is none of
    this run's configuration (missing, unreadable, or of another configuration)."""
    path = canary_dir(run_dir) / CANARY_RESULTS
    try:
        res = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if canary_binding_problem(read_config(run_dir), res) is not None:
        return None
    value = res.get("attainable_epsilon")
    return float(value) if isinstance(value, (int, float)) else None


def missing_audits(run_dir: str | Path, requirements: Requirements) -> list[AuditStep]:
    """The audits ``requirements`` need that ``run_dir`` does not hold yet."""
    run = check_run_dir(run_dir)
    steps: list[AuditStep] = []
    for tm in requirements.audits.threat_models_required:
        path = run / AUDIT / tm / "results.json"
        if not path.is_file():
            steps.append(AuditStep("threat-model", tm, f"no {AUDIT}/{tm}/results.json"))
            continue
        try:
            problem = audit_binding_problem(run, json.loads(path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            problem = "is unreadable"
        if problem is not None:
            steps.append(AuditStep("threat-model", tm, f"{AUDIT}/{tm}/results.json {problem}"))
    need = requirements.audits.min_strength
    if need is not None:
        have = _canary_strength(run)
        if have is None or have < need:
            cfg = read_config(run)
            delta = (cfg.privacy.delta or default_delta(1)) if cfg.privacy.enabled else 0.0  # the default's cap
            m = canaries_for_strength(need, cfg.federation.peers, delta=delta)
            steps.append(AuditStep("canary", "canary", "no canary audit of this configuration" if have is None else
                                   f"the canary audit can show at most eps >= {have:.3g} < min_strength {need:g}", m))
    return steps


def certify_with_audits(
    run_dir: str | Path,
    requirements: Requirements,
    signing_key: nacl.signing.SigningKey,
    *,
    rng: np.random.Generator,
    on_step: Callable[[AuditStep], None] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> tuple[dict[str, Any], list[AuditStep]]:
    """Run the audits ``requirements`` need that ``run_dir`` lacks, then certify it.

    Returns the certificate and the audits that were run. A failing audit stops
    before anything is signed; audits already written stay in the run directory.
    """
    run = check_run_dir(run_dir)
    steps = missing_audits(run, requirements)
    for step in steps:
        if on_step is not None:
            on_step(step)
        _LOG.info("certify: running %s audit %s (%s)", step.kind, step.name, step.reason)
        if step.kind == "canary":
            out = canary_dir(run)
            if out.exists() and not (out / CANARY_RESULTS).is_file():
                raise AuditError(f"{out} holds files but no {CANARY_RESULTS}; move it away and certify again")
            run_canary_audit(read_config(run), canaries_per_peer=int(step.canaries_per_peer or 0), rng=rng,
                             out_dir=out, progress=progress, state_root=run_state_root(run))
        else:
            audit_run_dir(run, threat_model=step.name, rng=rng, progress=progress)
    return certify(run, requirements, signing_key), steps


# ----------------------------------------------------------------------------- the whole job
@dataclass(frozen=True)
class PipelineResult:
    """What :func:`run_pipeline` did and where it left it."""

    run_dir: Path
    auditor_dir: Path
    trained: bool  # False when a finished run in ``run_dir`` was reused
    audits_run: tuple[AuditStep, ...]
    certificate: dict[str, Any]
    verified: VerifyResult

    @property
    def ok(self) -> bool:
        return bool(self.certificate.get("certified")) and self.verified.ok

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "run_dir": str(self.run_dir),
            "auditor_dir": str(self.auditor_dir),
            "trained": self.trained,
            "audits_run": [{"kind": s.kind, "name": s.name, "reason": s.reason,
                            "canaries_per_peer": s.canaries_per_peer} for s in self.audits_run],
            "verdict": self.certificate.get("verdict"),
            "results": self.certificate.get("results"),
            "certificate": str(self.run_dir / CERTIFICATE),
            "certificate_html": str(self.run_dir / CERTIFICATE_HTML),
            "verify": self.verified.to_dict(),
        }


def run_pipeline(
    cfg: RunConfig,
    out_dir: str | Path,
    requirements: Requirements,
    *,
    rng: np.random.Generator,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    on_step: Callable[[AuditStep], None] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> PipelineResult:
    """The whole job in one call: train ``cfg`` (``out/run``), run the audits
    ``requirements`` need, certify with an auditor key (``out/auditor``, made
    once), and verify the certificate against every artifact.

    A finished run already in ``out/run`` is reused, not retrained (its
    budget is spent); an existing auditor key is reused. The auditor key lives
    next to the run only because this is one machine playing every role: in a
    deployment the auditor is another party holding its own key (SECURITY.md).
    """
    out = Path(out_dir)
    run_dir, auditor = out / "run", out / "auditor"
    trained = not (run_dir / SUMMARY).is_file()
    if trained:
        run_federation(cfg, run_dir, on_round=on_round)
    elif read_config(run_dir).to_dict() != cfg.to_dict():
        raise ConfigError(f"{run_dir} holds a finished run of another configuration; choose another --out (a finished "
                          "run is reused, never retrained: its budget is spent)")
    else:
        _LOG.info("reusing the finished run in %s", run_dir)
    if not (auditor / AUDITOR_KEY).is_file():
        write_auditor_key(auditor)
    key = load_signing_key(auditor / AUDITOR_KEY)
    cert, steps = certify_with_audits(run_dir, requirements, key, rng=rng, on_step=on_step, progress=progress)
    checked = verify(run_dir / CERTIFICATE, auditor / AUDITOR_PUB, run_dir)
    return PipelineResult(run_dir, auditor, trained, tuple(steps), cert, checked)
