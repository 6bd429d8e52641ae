"""Researchers' tools: synthetic cohorts, simulated federations, baselines and reports."""
