"""One client's local training without Lightning's loop, for engines that run clients themselves (Flower).

It does what Lightning's automatic optimisation does in ``fedlight fit`` — zero the gradients, the
task's step (or the privacy plugin's per-example step), backward, the engine's ``on_gradients``
(client methods), gradient clipping, optimizer step — and calls the engine at the same points, so
both engines give the same trained state from the same batches.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterable
from typing import Any

import torch

from fedlight.core.engine import RoundEngine
from fedlight.core.update import ClientUpdate


def train_client(
    engine: RoundEngine,
    client_id: int,
    batches: Iterable[dict[str, Any]],
    make_optimizer: Callable[[], torch.optim.Optimizer],
    transfer: Callable[[dict[str, Any]], dict[str, Any]] = lambda batch: batch,
    clip_val: float | None = None,
    clip_algorithm: str = "norm",
) -> ClientUpdate | None:
    """``engine.start_client`` → local steps over ``batches`` → ``engine.finish_client`` (the update or None)."""
    module = engine.module
    engine.start_client(client_id)
    if not module.net.training:  # Lightning's fit loop has set train mode already (train() walks every module)
        module.train()
    optimizer = make_optimizer()  # fresh optimizer state for every client, as in `fedlight fit`
    params = [p for p in module.model.parameters() if p.requires_grad]
    step = module.private_step  # per-example privacy (DP-SGD), else the task's own step
    for batch in batches:
        batch = transfer(batch)
        engine.on_batch(batch)
        optimizer.zero_grad(set_to_none=True)
        try:
            out = step(module.model, module.task, batch) if step is not None else module.task.step(module.model, batch)
            out.loss.backward()
        except Exception:  # noqa: BLE001 - a crashing client is excluded from the round, as in `fedlight fit`
            engine.client_failed(client_id, traceback.format_exc())
            break
        engine.on_gradients(optimizer.param_groups[0]["lr"])
        if clip_val:
            if clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, clip_val)
        optimizer.step()
        engine.record_loss(float(out.loss.detach()))
    optimizer.zero_grad(set_to_none=True)
    return engine.finish_client()
