"""Ablation experiments (work in progress)."""
