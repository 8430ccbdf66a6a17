"""Evaluation: quality against real data and paired fidelity (quality), MACs / wall / memory (cost)."""
