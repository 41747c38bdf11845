"""Every random stream of a run, derived from (seed, purpose, round, client) in one place.

Why one module: a federated run is reproducible and resumable only if each consumer (round plan,
batch order, client privacy noise, attacks, server noise, …) draws from its own stream that depends
on nothing but its coordinates. Engines (Lightning in-process, Flower) call these functions instead
of copying formulas, so the same config + seed gives the same numbers on both.

The formulas are the ones fedlight has always used (changing any of them changes every result).
"""

from __future__ import annotations

import os
from enum import IntEnum

import numpy as np
import torch


def resolve_seed(seed: int | None) -> int:
    """An explicit seed, else ``seed_everything``'s (``PL_GLOBAL_SEED``), else 0."""
    if seed is not None:
        return int(seed)
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


class Stream(IntEnum):
    """Torch-generator streams of a round (``round_generator``); per-client streams add the client id."""

    SERVER = 0  # server-side privacy transforms and central noise
    ATTACK = 2  # colluding attackers' crafted updates
    CLIENT = 1000  # client k's pipeline (client-side privacy transform): CLIENT + k
    LOCAL_TRAINING = 5000  # client k's noise inside local training (DP-SGD): LOCAL_TRAINING + k


class Purpose(IntEnum):
    """NumPy streams fixed for the whole run (``run_rng``)."""

    MALICIOUS = 0xA77AC  # which clients are malicious
    COMPUTE_TIERS = 0xC0DE7  # which compute tier each client is in
    PERSONAL_SPLIT = 0x9E7A1  # label-matched validation shares for personalised evaluation
    RANKS = 0x4A4E  # per-client LoRA ranks (HetLoRA / FlexLoRA)


def round_generator(seed: int, round_idx: int, stream: int, client: int = 0) -> torch.Generator:
    """The torch generator of one stream in one round (``stream``: a :class:`Stream`, plus ``client``)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + round_idx) * 31 + int(stream) + client)


def aggregator_generator(seed: int, step: int, index: int) -> torch.Generator:
    """A server-side aggregator's own stream at its ``step``-th aggregation (FLoRA's re-initialised factors)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 7919 + index)


def run_rng(seed: int, purpose: Purpose | int, *more: int) -> np.random.Generator:
    """A NumPy generator for a run-wide draw (malicious set, tiers, …), optionally per client."""
    return np.random.default_rng([seed, int(purpose), *more])


def plan_rng(seed: int, round_idx: int) -> np.random.Generator:
    """Client sampling and dropouts of one round (``core.plan``)."""
    return np.random.default_rng([seed, round_idx])


def batch_rng(seed: int, round_idx: int, client: int) -> np.random.Generator:
    """The order of client k's local batches in a round (the round batch sampler)."""
    return np.random.default_rng([seed, round_idx, client])
