"""Orchestration: drivers above the protocol -- one real peer process, and the local launcher of all of them."""
