"""Several devices on one machine (or several): a round's clients spread over Lightning's DDP ranks.

``trainer.strategy: fedlight_ddp`` with ``trainer.devices: N`` (CPU with gloo, or CUDA with NCCL).
Every rank runs the whole round engine; the round's sampled clients are assigned to ranks
deterministically (balanced by planned local steps, :func:`assign_ranks`), each rank trains its own
(sequentially or grouped, ``federation.execution``), and before the server pipeline every rank
receives every rank's round part (updates, client state, features' scratch state:
:meth:`RoundEngine.round_part`), merged in plan order. The server pipeline then runs identically on
every rank (same updates, same order, same seeded generators), so every rank holds the same new global
state without a broadcast, and the result equals one device's.

Why not Lightning's ``ddp``: it wraps the model in ``DistributedDataParallel``, which averages the
gradients of the clients that different ranks train at the same time: unrelated clients' updates
would be mixed. ``fedlight_ddp`` is ``DDPStrategy`` without that wrapper (process group, launcher,
device placement and barriers are Lightning's).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry

from fedlight.core.plan import RoundPlan

STRATEGY = "fedlight_ddp"


class FederatedDDPStrategy(DDPStrategy):
    """``DDPStrategy`` whose model is not wrapped in ``DistributedDataParallel`` (ranks train different clients)."""

    strategy_name = STRATEGY

    def configure_ddp(self) -> None:
        """Keep the LightningModule unwrapped: no gradient all-reduce between ranks."""


if STRATEGY not in StrategyRegistry:
    StrategyRegistry.register(
        STRATEGY,
        FederatedDDPStrategy,
        description="fedlight: a round's clients spread over DDP ranks",
        start_method="popen",
    )


def assign_ranks(plan: RoundPlan, world_size: int) -> list[list[int]]:
    """Positions in ``plan.training`` that each rank trains: longest planned steps first, each to the least
    loaded rank (ties: lowest rank), every rank's positions in plan order. Same plan, same assignment."""
    load = [0] * world_size
    ranks: list[list[int]] = [[] for _ in range(world_size)]
    for k in sorted(range(len(plan.training)), key=lambda k: (-plan.steps[k], k)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        ranks[rank].append(k)
        load[rank] += max(plan.steps[k], 1)
    return [sorted(positions) for positions in ranks]


def gather_round(engine: Any, world_size: int) -> None:
    """Every rank's round part to every rank, merged into the engine's round (a collective: all ranks call it)."""
    import torch.distributed as dist

    parts: list[Any] = [None] * world_size
    dist.all_gather_object(parts, engine.round_part())
    engine.merge_round_parts(parts)
