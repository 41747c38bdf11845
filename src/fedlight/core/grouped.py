"""Grouped clients: G sampled clients train in one vectorised forward/backward over one frozen backbone.

Each client of a group has its own slot in stacked copies of the trainable tensors (``[G, *shape]``);
``torch.func.vmap`` over ``functional_call`` runs the task's loss for every slot on that client's own
batch, with the frozen backbone shared (it exists once, unbatched). What makes this equal to training
the clients one after another:

* each client keeps its own data order (the batches the sequential path would give it);
* elementwise optimizers (SGD, Adam, AdamW, …) over stacked tensors update every slot exactly as a
  separate optimizer per client would (weight decay and moments are elementwise too);
* gradient clipping is per slot (each client's own norm);
* a client with fewer local steps (compute tiers, stragglers) or whose step raised is masked out of
  the remaining steps (its slot is restored after every later optimizer step);
* round features see every client as the current one around its own batches, in sequential order.

Batches of different shapes (a short client's smaller batch, padded text of other lengths) are vmapped
in buckets of equal shape. Where the task declares labels its loss ignores (``Task.ignore_label_keys``,
``F.cross_entropy``'s -100), batches that differ only in their number of examples share one bucket: the
shorter are padded with copies of their first example labelled -100, which changes neither the loss
nor the gradients (non-IID clients with a few examples would otherwise cost a vmap call each). A bucket
that raises is retried slot by slot, so a crashing client is isolated as in the sequential path.

What cannot be stacked (per-example DP-SGD, features keeping per-client state in local training,
non-elementwise optimizers, BatchNorm in train mode) is refused by
:func:`fedlight.core.compat.grouping_blocker` and runs sequentially.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fedlight.core.engine import ClientRun, RoundEngine
from fedlight.core.update import ClientUpdate
from fedlight.tasks.base import IGNORE_INDEX, TaskLoss

Batch = dict[str, Any]


def _signature(batch: Batch) -> tuple:
    """Batches with equal signatures stack: same keys, tensor shapes/dtypes, and equal other values."""
    return tuple(
        (k, (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else repr(v)) for k, v in sorted(batch.items())
    )


def _row_signature(batch: Batch, label_keys: tuple[str, ...]) -> tuple | None:
    """The signature of ``batch`` without its number of examples, where padding it is exact: every tensor
    has the examples as its first dimension and the labels are class indices; else None."""
    if not label_keys or not all(isinstance(batch.get(k), torch.Tensor) for k in label_keys):
        return None
    n = len(batch[label_keys[0]])
    if any(torch.is_floating_point(batch[k]) for k in label_keys):
        return None  # soft labels: -100 would not be ignored
    signature: list[tuple[str, Any]] = []
    for k, v in sorted(batch.items()):
        if isinstance(v, torch.Tensor):
            if v.dim() == 0 or v.shape[0] != n:
                return None
            signature.append((k, (tuple(v.shape[1:]), v.dtype)))
        else:
            signature.append((k, repr(v)))
    return ("rows", *signature)


def _pad(batch: Batch, size: int, label_keys: tuple[str, ...]) -> Batch:
    """``batch`` with ``size`` examples: copies of its first example, labelled ``IGNORE_INDEX``, appended."""
    n = len(batch[label_keys[0]])
    if n == size:
        return batch
    padded = dict(batch)
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            fill = v[:1].expand(size - n, *v.shape[1:])
            padded[k] = torch.cat([v, torch.full_like(fill, IGNORE_INDEX) if k in label_keys else fill])
    return padded


def _stack(batches: Sequence[Batch]) -> tuple[Batch, Batch]:
    """(stacked tensors ``[G, ...]``, the non-tensor values they share)."""
    first = batches[0]
    tensors = {k: torch.stack([b[k] for b in batches]) for k, v in first.items() if isinstance(v, torch.Tensor)}
    return tensors, {k: v for k, v in first.items() if k not in tensors}


class GroupedTrainer:
    """Trains groups of clients of one engine's model (built once per run: the loss wrapper and names)."""

    def __init__(self, engine: RoundEngine) -> None:
        self.engine = engine
        model = engine.module.net
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = dict(model.named_parameters())
        self.loss = TaskLoss(model, engine.module.task)
        self.label_keys: tuple[str, ...] = tuple(engine.module.task.ignore_label_keys)
        # timm's fused attention (scaled_dot_product_attention) has no vmap batching rule for its CPU
        # kernel: vmapped, it runs slot by slot. Grouped steps use timm's explicit attention (same maths).
        self.fused = [m for m in model.modules() if getattr(m, "fused_attn", None) is True]

    def _grads(self, slot_params: dict[str, torch.Tensor], tensors: Batch, rest: Batch, vectorised: bool):
        """Gradients and losses of the task's loss for stacked (``vectorised``) or single-slot parameters."""
        from torch.func import functional_call, grad, vmap

        def loss_of(params: dict[str, torch.Tensor], batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
            named = {f"model.{n}": p for n, p in params.items()}
            loss = functional_call(self.loss, named, ({**rest, **batch},), tie_weights=False, strict=False)
            return loss, loss.detach()

        step = grad(loss_of, has_aux=True)
        if not vectorised:
            return step(slot_params, tensors)
        return vmap(step, in_dims=(0, 0), randomness="different")(slot_params, tensors)

    def train(
        self,
        unit: Sequence[tuple[int, Sequence[Batch]]],
        make_optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
        clip_val: float | None = None,
        clip_algorithm: str = "norm",
    ) -> list[ClientUpdate | None]:
        """``start_client`` for every client of ``unit``, their local steps side by side, then ``finish_client``
        for each in order: the updates, as the sequential path would return them."""
        engine, names = self.engine, self.names
        runs: list[ClientRun] = []
        stacked = {n: self.params[n].new_empty((len(unit), *self.params[n].shape)) for n in names}
        for i, (client_id, _) in enumerate(unit):
            engine.start_client(client_id)  # its start state (and local tensors) into the model: slot i
            with torch.no_grad():
                for n in names:
                    stacked[n][i].copy_(self.params[n])
            runs.append(engine.suspend_client())
        optimizer = make_optimizer(list(stacked.values()))
        longest = max((len(batches) for _, batches in unit), default=0)
        for m in self.fused:
            m.fused_attn = False
        try:
            self._steps(unit, runs, stacked, optimizer, longest, clip_val, clip_algorithm)
        finally:
            for m in self.fused:
                m.fused_attn = True
        updates = []
        for i, run in enumerate(runs):  # finish in order: the updates arrive as in sequential execution
            with torch.no_grad():  # finish_client reads the model: the slot's trained tensors go in first
                for n in names:
                    self.params[n].copy_(stacked[n][i])
            engine.resume_client(run)
            updates.append(engine.finish_client())
        return updates

    def _steps(self, unit, runs, stacked, optimizer, longest: int, clip_val, clip_algorithm: str) -> None:
        failed = self.engine.round.failed
        with torch.enable_grad():
            for step in range(longest):
                active = [i for i, (c, batches) in enumerate(unit) if step < len(batches) and c not in failed]
                if not active:
                    break
                grads = {n: torch.zeros_like(v) for n, v in stacked.items()}
                for bucket, batches in self._buckets(unit, runs, active, step).items():
                    self._bucket_step(bucket, batches, stacked, grads, runs)
                active = [i for i in active if unit[i][0] not in failed]  # without those that just raised
                if clip_val:
                    _clip_per_slot(grads, active, clip_val, clip_algorithm)
                self._optimizer_step(optimizer, stacked, grads, active)

    def _buckets(self, unit, runs: list[ClientRun], active: list[int], step: int) -> dict[tuple[int, ...], list[Batch]]:
        """This step's batches of the active slots (features see each client's own), by stackable shape."""
        by_signature: dict[tuple, tuple[list[int], list[Batch]]] = {}
        for i in active:
            batch = dict(unit[i][1][step])
            self.engine.resume_client(runs[i])
            self.engine.on_batch(batch)
            self.engine.suspend_client()
            key = _row_signature(batch, self.label_keys) or _signature(batch)
            slots, batches = by_signature.setdefault(key, ([], []))
            slots.append(i)
            batches.append(batch)
        buckets = {}
        for key, (slots, batches) in by_signature.items():
            if key[0] == "rows":  # one bucket of the largest batch size, the shorter ones padded
                size = max(len(b[self.label_keys[0]]) for b in batches)
                batches = [_pad(b, size, self.label_keys) for b in batches]
            buckets[tuple(slots)] = batches
        return buckets

    def _bucket_step(self, bucket, batches, stacked, grads, runs) -> None:
        index = torch.tensor(bucket)
        tensors, rest = _stack(batches)
        try:
            got, losses = self._grads({n: v[index] for n, v in stacked.items()}, tensors, rest, vectorised=True)
        except Exception:  # noqa: BLE001 - find which client's step raises: retry the slots one by one
            for j, i in enumerate(bucket):
                try:
                    one, loss = self._grads(
                        {n: v[i] for n, v in stacked.items()}, {k: t[j] for k, t in tensors.items()}, rest, False
                    )
                except Exception:  # noqa: BLE001 - a crashing client is excluded from the round
                    self.engine.client_failed(runs[i].client_id, traceback.format_exc())
                    continue
                for n, g in one.items():
                    grads[n][i] = g
                runs[i].losses.append(float(loss))
            return
        for n, g in got.items():
            grads[n][index] = g
        for i, loss in zip(bucket, losses.tolist(), strict=True):
            runs[i].losses.append(loss)

    @staticmethod
    def _optimizer_step(optimizer, stacked, grads, active: list[int]) -> None:
        """One optimizer step for the active slots; the others' tensors are restored afterwards."""
        resting = [i for i in range(next(iter(stacked.values())).shape[0]) if i not in active]
        kept = {n: v[resting].clone() for n, v in stacked.items()} if resting else {}
        for n, v in stacked.items():
            v.grad = grads[n]
        optimizer.step()
        with torch.no_grad():
            for n, v in kept.items():
                stacked[n][resting] = v
        for v in stacked.values():
            v.grad = None


def _clip_per_slot(grads: dict[str, torch.Tensor], active: list[int], clip_val: float, algorithm: str) -> None:
    """Each slot's gradients clipped as ``clip_grad_norm_`` / ``clip_grad_value_`` would clip one client's."""
    if algorithm == "value":
        for g in grads.values():
            g.clamp_(-clip_val, clip_val)
        return
    slots = torch.tensor(active)
    norms = torch.stack([torch.linalg.vector_norm(g[slots].flatten(1), dim=1) for g in grads.values()], dim=1)
    total = torch.linalg.vector_norm(norms, dim=1)
    scale = torch.clamp(clip_val / (total + 1e-6), max=1.0)
    for g in grads.values():
        g[slots] *= scale.view(-1, *([1] * (g.dim() - 1))).to(g.dtype)
