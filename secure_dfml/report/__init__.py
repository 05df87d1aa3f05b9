"""Reporting helpers shared by the CLI and the written reports: plots, and the
percentage cells of every result table."""

from secure_dfml._jsonutil import pct

__all__ = ["pct"]
