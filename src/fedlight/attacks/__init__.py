"""Attacks: malicious-client behaviours for evaluating robust aggregation (not for production runs)."""
