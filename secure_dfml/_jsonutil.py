"""Helpers shared by the result writers (audits, budget sweeps, CLI tables):
strict JSON, timestamps, percentage cells."""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


def jsonable(obj: Any) -> Any:
    """Plain JSON types; non-finite floats become None (strict JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def json_text(obj: Any) -> str:
    """``obj`` as indented strict JSON (via :func:`jsonable`), newline-terminated."""
    return json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n"


def pct(v: Any) -> str:
    """A fraction as a percentage with one decimal, "-" when missing."""
    return "-" if v is None else f"{100 * v:.1f}"


def utc_now() -> str:
    """The current UTC time as ``YYYY-MM-DDTHH:MM:SSZ``."""
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
