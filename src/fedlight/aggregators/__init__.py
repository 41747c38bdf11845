"""Aggregators: new global trainable state from the old one and the clients' deltas."""
