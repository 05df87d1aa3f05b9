"""The run directory: its layout, and the one place that writes and reads it.

A run directory (written by ``secure-dfml run`` and ``secure-dfml launch``)::

    RUN_DIR/
      config.toml                          the config the run started with
      metrics.jsonl                        one JSON record per round
      summary.json                         the run's summary
      models/peer_XXX_final.safetensors    each peer's final model
      models/peer_XXX_peak.safetensors     ... and its peak model (best global accuracy)
      views/received/peer_XXX.safetensors  peer XXX's latest model as an aggregator received it
      views/returned/peer_XXX.safetensors  the latest model returned to sender XXX
      ledgers/peer_<id>.json               privacy ledgers (private runs)
      capture/                             every envelope as sent (:class:`~secure_dfml.transport.CaptureTap`)
      accuracy.png                         accuracy per round
      audit/<threat model>/                results.json and report.html of ``secure-dfml audit``

A run in progress writes ``RUN_DIR.partial/`` (with ``run.json`` and
``checkpoints/`` besides) and renames it into place once it finishes.

Peer ids have three digits in model and view file names (``peer_007``) and
none in ledger names (``peer_7.json``, :func:`secure_dfml.privacy.ledger_path`,
the same name a peer's state directory uses).  Everything here is data (JSON,
TOML, safetensors): nothing is ever unpickled.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from secure_dfml._fsutil import fresh_dir, stamp
from secure_dfml.config import RunConfig, dump_toml, load_config
from secure_dfml.errors import RunDirectoryError, SecureDFMLError
from secure_dfml.privacy import atomic_write_bytes, ledger_path
from secure_dfml.transport import CapturedMessage, read_capture

if TYPE_CHECKING:
    from secure_dfml.protocol._interfaces import PeerState

__all__ = [
    "AUDIT",
    "CAPTURE",
    "CHECKPOINTS",
    "CONFIG",
    "LEDGERS",
    "METRICS",
    "MODELS",
    "MODEL_KINDS",
    "PARTIAL_SUFFIX",
    "PLOT",
    "RUN_META",
    "SUMMARY",
    "VIEWS",
    "VIEW_KINDS",
    "VIEW_RECEIVED",
    "VIEW_RETURNED",
    "Views",
    "append_metrics",
    "audit_dir",
    "capture_dir",
    "check_run_dir",
    "config_file",
    "latest_views",
    "ledger_file",
    "ledgers_dir",
    "metrics_file",
    "model_file",
    "model_name",
    "models_dir",
    "partial_dir",
    "plot_file",
    "read_capture_of",
    "read_config",
    "read_metrics",
    "read_state",
    "read_summary",
    "save_models",
    "save_views",
    "summary_file",
    "view_file",
    "view_name",
    "views_dir",
    "write_config",
    "write_metrics",
    "write_summary",
]

logger = logging.getLogger(__name__)

CONFIG = "config.toml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
MODELS = "models"
VIEWS = "views"
LEDGERS = "ledgers"
CAPTURE = "capture"
PLOT = "accuracy.png"
AUDIT = "audit"
MANIFEST = "manifest.json"  # sha256 of every artifact (secure_dfml.certify.write_manifest)
CANARY = "canary"  # audit/canary: the canary audit of the run's configuration
CANARY_RESULTS = "canary.json"
RUN_META = "run.json"  # only while a run is in progress
CHECKPOINTS = "checkpoints"  # only while a run is in progress
PARTIAL_SUFFIX = ".partial"

MODEL_KINDS = ("final", "peak")
VIEW_RECEIVED = "received"
VIEW_RETURNED = "returned"
VIEW_KINDS = (VIEW_RECEIVED, VIEW_RETURNED)

#: (view, peer) -> (round, state): the models a node kept as a curious party would see them.
Views = Mapping[tuple[str, int], tuple[int, Mapping[str, torch.Tensor]]]


# ----------------------------------------------------------------------------- names
def config_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / CONFIG


def metrics_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / METRICS


def summary_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / SUMMARY


def plot_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / PLOT


def models_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / MODELS


def model_name(peer_id: int, which: str = "final") -> str:
    """``peer_XXX_final.safetensors`` or ``peer_XXX_peak.safetensors``."""
    if which not in MODEL_KINDS:
        raise RunDirectoryError(f"model kind {which!r} is not one of {', '.join(MODEL_KINDS)}")
    return f"peer_{peer_id:03d}_{which}.safetensors"


def model_file(run_dir: str | Path, peer_id: int, which: str = "final") -> Path:
    return models_dir(run_dir) / model_name(peer_id, which)


def views_dir(run_dir: str | Path, view: str | None = None) -> Path:
    """``views/`` or, with ``view``, ``views/received`` / ``views/returned``."""
    root = Path(run_dir) / VIEWS
    if view is None:
        return root
    if view not in VIEW_KINDS:
        raise RunDirectoryError(f"view {view!r} is not one of {', '.join(VIEW_KINDS)}")
    return root / view


def view_name(peer_id: int) -> str:
    return f"peer_{peer_id:03d}.safetensors"


def view_file(run_dir: str | Path, view: str, peer_id: int) -> Path:
    return views_dir(run_dir, view) / view_name(peer_id)


def ledgers_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / LEDGERS


def ledger_file(run_dir: str | Path, peer_id: int) -> Path:
    return ledger_path(ledgers_dir(run_dir), peer_id)


def capture_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CAPTURE


def audit_dir(run_dir: str | Path, threat_model: str) -> Path:
    return Path(run_dir) / AUDIT / threat_model


def partial_dir(run_dir: str | Path) -> Path:
    """Where a run into ``run_dir`` writes until it finishes."""
    run_dir = Path(run_dir)
    return run_dir.with_name(run_dir.name + PARTIAL_SUFFIX)


def lock_file(run_dir: str | Path) -> Path:
    """The lock a run (or launch) into ``run_dir`` holds, beside it (a second process is refused)."""
    run_dir = Path(run_dir)
    return run_dir.with_name(f".{run_dir.name}.lock")


# ----------------------------------------------------------------------------- writers
def open_partial(run_dir: Path, *, resume: bool, overwrite: bool, meta_name: str, what: str) -> dict[str, Any] | None:
    """Get ``run_dir``'s partial folder ready for a run (or a launch).

    ``resume``: the interrupted run's metadata (``meta_name`` in the partial
    folder), or a :class:`RunDirectoryError` when there is none.  Otherwise an
    empty partial folder and None: finished results are refused unless
    ``overwrite``, and an interrupted run found there is kept aside as
    ``<run_dir>.crashed-<time>`` (its ledgers included), never deleted.
    """
    partial = partial_dir(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirectoryError(f"--out {run_dir} is a file, not a directory; choose a directory path for the {what}")
    if resume:
        if not (partial / meta_name).is_file():
            raise RunDirectoryError(
                f"nothing to resume in {run_dir}: no interrupted {what} ({partial} has no {meta_name}); "
                "start a new one instead"
            )
        return dict(json.loads((partial / meta_name).read_text(encoding="utf-8")))
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise RunDirectoryError(f"{run_dir} already holds results; choose another --out or pass --overwrite to replace them.")
    if partial.exists():
        kept = run_dir.with_name(f"{run_dir.name}.crashed-{stamp()}")
        partial.rename(kept)
        logger.warning(
            "an earlier %s into %s stopped before finishing; it is kept (ledgers included) in %s "
            "(--resume would have continued it)", what, run_dir, kept,
        )
    fresh_dir(partial)
    return None


def write_config(run_dir: str | Path, cfg: RunConfig) -> Path:
    path = config_file(run_dir)
    atomic_write_bytes(path, dump_toml(cfg).encode("utf-8"))
    return path


def write_metrics(run_dir: str | Path, records: Iterable[Mapping[str, Any]]) -> Path:
    """``metrics.jsonl`` holding exactly ``records`` (written atomically)."""
    path = metrics_file(run_dir)
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in records).encode("utf-8"))
    return path


def append_metrics(run_dir: str | Path, record: Mapping[str, Any]) -> None:
    """Append one round's record to ``metrics.jsonl`` and make it durable."""
    with open(metrics_file(run_dir), "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def write_summary(run_dir: str | Path, summary: Mapping[str, Any]) -> Path:
    path = summary_file(run_dir)
    atomic_write_bytes(path, json.dumps(summary, indent=2).encode("utf-8"))
    return path


def _contiguous(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in state.items()}


def save_models(p: PeerState, models_dir: Path) -> None:
    """A peer's final (and peak) model, named as in ``models/`` (also used for a
    peer's state directory)."""
    models_dir.mkdir(parents=True, exist_ok=True)
    meta = {"arch": p.arch, "peer": str(p.peer_id)}
    save_file(_contiguous(p.model.state_dict()), str(models_dir / model_name(p.peer_id, "final")), metadata=meta)
    if p.peak_state is not None:
        save_file(
            _contiguous(p.peak_state),
            str(models_dir / model_name(p.peer_id, "peak")),
            metadata={**meta, "round": str(p.peak_round)},
        )


def latest_views(views: Sequence[Views]) -> dict[tuple[str, int], tuple[int, Mapping[str, torch.Tensor]]]:
    """The latest model of each (view, peer) over several nodes' own views."""
    latest: dict[tuple[str, int], tuple[int, Mapping[str, torch.Tensor]]] = {}
    for own in views:
        for key, (round_index, state) in own.items():
            if key not in latest or round_index > latest[key][0]:
                latest[key] = (round_index, state)
    return latest


def save_views(views: Views, archs: Sequence[str], views_dir: Path) -> None:
    """Models as a curious aggregator received them and as senders got them back,
    named as in ``views/`` (also used for a peer's state directory)."""
    for (view, peer), (round_index, state) in sorted(views.items()):
        (views_dir / view).mkdir(parents=True, exist_ok=True)
        save_file(
            _contiguous(state),
            str(views_dir / view / view_name(peer)),
            metadata={"arch": archs[peer], "peer": str(peer), "view": view, "round": str(round_index)},
        )


# ----------------------------------------------------------------------------- readers
def check_run_dir(run_dir: str | Path) -> Path:
    """``run_dir`` if it is a folder holding ``config.toml``; else a
    :class:`~secure_dfml.errors.RunDirectoryError` that says what it is instead."""
    path = Path(run_dir)
    if path.is_file():
        raise RunDirectoryError(
            f"{path} is a file, not a run directory; pass the folder written by `secure-dfml run` "
            f"(the one holding {CONFIG})."
        )
    if not path.is_dir():
        raise RunDirectoryError(f"run directory {path} does not exist; pass a folder written by `secure-dfml run`.")
    if not config_file(path).is_file():
        raise RunDirectoryError(
            f"{path} has no {CONFIG}, so it is not a complete run directory "
            f"(a run writes {CONFIG}, {METRICS}, {SUMMARY}, {MODELS}/ and {VIEWS}/)."
        )
    return path


def read_config(run_dir: str | Path) -> RunConfig:
    """The config of the run in ``run_dir`` (checked to be a run directory first)."""
    path = check_run_dir(run_dir)
    try:
        return load_config(config_file(path))
    except SecureDFMLError as exc:
        raise RunDirectoryError(f"{config_file(path)} cannot be loaded: {exc}") from exc


def read_summary(run_dir: str | Path) -> dict[str, Any] | None:
    """``summary.json``, or None when the run wrote none."""
    path = summary_file(run_dir)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise RunDirectoryError(f"{path} is unreadable: {exc}") from exc
    if not isinstance(data, dict):
        raise RunDirectoryError(f"{path} holds {type(data).__name__}, not a JSON object")
    return data


def read_metrics(run_dir: str | Path, *, limit: int | None = None) -> list[dict[str, Any]]:
    """The round records of ``metrics.jsonl`` (the first ``limit`` of them);
    empty when the run wrote none.  A line that is not JSON is refused with its number."""
    path = metrics_file(run_dir)
    if not path.is_file():
        return []
    records: list[dict[str, Any]] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if limit is not None and len(records) >= limit:
            break
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise RunDirectoryError(f"{path} line {n} is not JSON: {exc}") from exc
    return records


def read_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A model file of a run directory: (state dict, metadata such as arch, peer, round)."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
        state = load_file(str(path))
    except (OSError, SafetensorError, ValueError) as exc:
        raise RunDirectoryError(f"cannot read model file {path}: {exc}") from exc
    return state, meta


def read_capture_of(run_dir: str | Path) -> list[CapturedMessage] | None:
    """The envelopes captured on the wire during the run, or None when the run
    directory has no ``capture/`` (runs written before traffic capture)."""
    root = capture_dir(run_dir)
    if not root.is_dir():
        return None
    return read_capture(root)
