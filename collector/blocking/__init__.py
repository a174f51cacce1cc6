"""Blocking experiments (work in progress)."""
