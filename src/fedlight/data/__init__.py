"""Offline datasets: labelled examples that install with the project (no hub downloads)."""
