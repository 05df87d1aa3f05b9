"""What every run-directory audit needs besides the run's files.

* :func:`rebuild_federation` -- the run's data set, split and peers, rebuilt
  from its config (deterministic in the seeds), so that members and
  non-members of each peer are known again;
* :class:`ModelTarget` and :func:`load_model` -- a model file of the run
  directory as a module of its architecture;
* :func:`results_header` -- the fields every audit's ``results.json`` starts with;
* :func:`selected_peers` -- the peers an audit looks at.

Shared by the membership-inference audit (:mod:`secure_dfml.audit._rundir`)
and the eavesdropper analysis (:mod:`secure_dfml.audit._eavesdropper`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from secure_dfml._jsonutil import utc_now
from secure_dfml._run import Federation, build_federation
from secure_dfml.audit._threat_models import ThreatModel
from secure_dfml.config import RunConfig
from secure_dfml.errors import AuditError, RunDirectoryError
from secure_dfml.models import build_model
from secure_dfml.rundir import MANIFEST, read_state, read_summary

__all__ = [
    "RESULTS_FORMAT",
    "RESULTS_VERSION",
    "ModelTarget",
    "load_model",
    "rebuild_federation",
    "results_header",
    "selected_peers",
]

RESULTS_FORMAT = "secure-dfml-audit"
RESULTS_VERSION = 3  # 2: findings are {level, text} records (were strings); 3: each attack carries a compact
#   ROC ("roc": {"fpr", "tpr", "points"}, at most ROC_MAX_POINTS vertices); readers treat it as optional


def rebuild_federation(cfg: RunConfig) -> Federation:
    """Rebuild a run's data set, split and peers (no training, no ledgers).

    The seeds in ``cfg`` make this deterministic. Privacy, key files and CKKS
    do not influence the data, so they are switched off for the rebuild (no
    Opacus or TenSEAL set-up, no passphrase needed).
    """
    quiet = cfg.replace(privacy={"enabled": False}, crypto={"keys_dir": None, "secure_aggregation": "none"})
    return build_federation(quiet, ledger_dir=None)


@dataclass(frozen=True)
class ModelTarget:
    """One model file an adversary holds, and whose data it is attacked for."""

    key: str  # label used in tables and figures
    owner: int  # the peer whose data (members / non-members) is attacked
    model_path: Path
    model_kind: str  # received | returned | final | peak
    arch: str
    via: int | None = None  # received: the sender; returned: the recipient sender

    def describe(self) -> dict[str, Any]:
        return {
            "target": self.key,
            "data_owner": self.owner,
            "model": self.model_kind,
            "model_file": str(self.model_path),
            "arch": self.arch,
            "via_peer": self.via,
        }


def selected_peers(peers: Sequence[int] | None, n: int) -> list[int]:
    """The sorted peer ids an audit looks at (all ``n`` when ``peers`` is None);
    ids outside 0..n-1 are refused."""
    wanted = list(range(n)) if peers is None else sorted(set(peers))
    bad = [p for p in wanted if not 0 <= p < n]
    if bad:
        raise AuditError(f"peers {bad} do not exist; the run has peers 0..{n - 1}")
    return wanted


def load_model(target: ModelTarget, dataset: Any) -> torch.nn.Module:
    """``target``'s model file as a module of its architecture, in eval mode."""
    try:
        state, meta = read_state(target.model_path)
    except RunDirectoryError as exc:
        raise AuditError(str(exc)) from exc
    arch = meta.get("arch", target.arch)
    if arch != target.arch:
        raise AuditError(
            f"{target.model_path} holds a {arch!r} model but the run's config gives {target.arch!r} for that peer"
        )
    model = build_model(arch, input_shape=dataset.input_shape, num_classes=dataset.num_classes, kind=dataset.kind,
                        generator=torch.Generator().manual_seed(0))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise AuditError(f"{target.model_path} does not match architecture {arch!r}: {exc}") from exc
    model.eval()
    return model


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def results_header(run_dir: Path, cfg: RunConfig, tm: ThreatModel, fed: Federation) -> dict[str, Any]:
    """The fields every audit's results.json starts with: format, when, which run
    and threat model, and the run's federation (peers, data sizes, privacy, channel)."""
    return {
        "format": RESULTS_FORMAT,
        "version": RESULTS_VERSION,
        "created": utc_now(),
        "run_dir": str(run_dir),
        # which run, as it was when audited: certify reuses an audit only for the same artifacts
        "run_id": (read_summary(run_dir) or {}).get("run_id"),
        "run_manifest_sha256": _sha256(run_dir / MANIFEST) if (run_dir / MANIFEST).is_file() else None,
        "threat_model": tm.to_dict(),
        "run": {
            "federation": cfg.federation.id,
            "algorithm": cfg.federation.algorithm,
            "dataset": fed.dataset.name,
            "peers": len(fed.peers),
            "architectures": [p.arch for p in fed.peers],
            "train_sizes": [int(len(p.train)) for p in fed.split.peers],
            "holdout_sizes": [int(len(p.holdout)) for p in fed.split.peers],
            "auditor_pool": int(len(fed.split.auditor_pool)),
            "private": bool(cfg.privacy.enabled),
            "channel": cfg.crypto.channel,
            "secure_aggregation": cfg.crypto.secure_aggregation,
            "pad_messages": cfg.crypto.pad_messages,
        },
    }
