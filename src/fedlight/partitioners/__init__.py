"""Partitioners split training examples into per-client index lists, seeded."""
