"""Sample-level DP-SGD inside local training: per-example clipping and Gaussian noise at every local step.

Per-example gradients come from ``torch.func`` (``functional_call`` + ``vmap`` + ``grad``) over the
task's own loss, so any task/PEFT method whose forward is vmappable works; a per-example loop is the
fallback (``per_sample_grads: auto`` tries vmap once and falls back, ``loop`` forces it). Opacus is
not used: it is not a dependency and its ``GradSampleModule`` hooks would wrap the PEFT model behind
Lightning's back; ``torch.func`` needs no model surgery.

How the private gradient reaches the optimizer: :meth:`DPSGD.private_step` computes
``g = (sum_i clip_C(g_i) + N(0, (sigma C)^2 I)) / B`` and returns a *surrogate* loss whose value
is the batch's mean loss and whose gradient with respect to the trainable parameters is exactly
``g`` (``loss.detach() + sum(p * g) - sum(p * g).detach()``), so Lightning's ordinary automatic
optimisation (backward, optimizer step, other engineers' hooks around ``training_step``) applies it.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from torch import nn

from fedlight.hookspecs import hookimpl
from fedlight.privacy.accounting import Accountant, check_mechanism_args, noise_for_epsilon
from fedlight.privacy.base import Privacy, RunSpec
from fedlight.tasks.base import StepOutput, Task, TaskLoss


def _split_batch(batch: dict[str, Any]) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]]:
    """(batch size, per-example tensors, everything else) of a collated batch."""
    size = None
    for key in ("labels", "client_id"):
        if isinstance(batch.get(key), torch.Tensor) and batch[key].dim() > 0:
            size = int(batch[key].shape[0])
            break
    if size is None:
        size = next(int(v.shape[0]) for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    batched = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == size}
    rest = {k: v for k, v in batch.items() if k not in batched}
    return size, batched, rest


def per_sample_gradients(
    model: nn.Module, task: Task, batch: dict[str, Any], method: Literal["vmap", "loop"] = "vmap"
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-example gradients ``{param name: [B, *shape]}`` of the trainable parameters, and the B losses.

    ``vmap``: one vectorised ``torch.func.grad`` over examples (dropout draws differ per example).
    ``loop``: one forward/backward per example (the reference the vmap path is tested against).
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    size, batched, rest = _split_batch(batch)
    if method == "loop":
        trainable = [p for n, p in model.named_parameters() if p.requires_grad]
        grads: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        losses = []
        for i in range(size):
            one = {**rest, **{k: v[i : i + 1] for k, v in batched.items()}}
            loss = task.step(model, one).loss
            for n, g in zip(names, torch.autograd.grad(loss, trainable, allow_unused=True), strict=True):
                grads[n].append(torch.zeros_like(trainable[names.index(n)]) if g is None else g)
            losses.append(loss.detach())
        return {n: torch.stack(v) for n, v in grads.items()}, torch.stack(losses)
    if method != "vmap":
        raise ValueError(f"per-sample gradient method must be 'vmap' or 'loop', got {method!r}")
    from torch.func import functional_call, grad, vmap

    wrapper = TaskLoss(model, task)
    params = {f"model.{n}": p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def loss_one(
        params: dict[str, torch.Tensor], example: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        one = {**rest, **{k: v.unsqueeze(0) for k, v in example.items()}}
        loss = functional_call(wrapper, params, (one,))
        return loss, loss.detach()

    grads_, losses = vmap(grad(loss_one, has_aux=True), in_dims=(None, 0), randomness="different")(params, batched)
    return {n: grads_[f"model.{n}"] for n in names}, losses


def clip_per_sample(grads: dict[str, torch.Tensor], clip_norm: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Scale each example's gradient (over all parameters jointly) to L2 norm <= C; returns (clipped, norms).

    Norms are accumulated in fp64 after dividing by each example's largest magnitude (no overflow);
    the factor is ``C / max(norm, C)``, so an all-zero gradient stays zero.
    """
    flat = [g.detach().reshape(g.shape[0], -1).double() for g in grads.values()]
    scale = torch.stack([f.abs().amax(1) for f in flat]).amax(0) if flat else torch.zeros(0, dtype=torch.float64)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    norms = safe * torch.sqrt(sum(((f / safe[:, None]).pow(2).sum(1) for f in flat), torch.zeros_like(safe)))
    norms = torch.where(scale > 0, norms, torch.zeros_like(norms))
    factor = clip_norm / torch.clamp(norms, min=clip_norm)
    factor = factor * (1 - 1e-6)  # keep the fp32 result at or under C after rounding
    out = {n: (g.double() * factor.view(-1, *([1] * (g.dim() - 1)))).to(g.dtype) for n, g in grads.items()}
    return out, norms


class DPSGD(Privacy):
    """Sample-level DP-SGD in local training: per-example clipping + Gaussian noise per step (Abadi et al. 2016).

    Every local step of client k computes per-example gradients of the trainable (PEFT) parameters,
    clips each to L2 norm ``max_grad_norm`` (C), sums them, adds N(0, (sigma C)^2) per coordinate
    and divides by the batch size B; the optimizer then steps on that gradient. The released
    update is post-processing of these steps, so DP-SGD composes with any aggregator, codec and
    secure aggregation.

    Accounting (per client, example-level adjacency inside that client's data): every step of
    client k is one sampled Gaussian event over its n_k examples with the batch size actually drawn.
    The round plan makes the loader draw each step's batch as an independent uniform subset of
    B = min(batch_size, n_k) examples without replacement (``batch_sampling = "subsample"``), which is
    exactly dp-accounting's ``SampledWithoutReplacementDpEvent(n_k, B)`` (Wang et al. 2019), under
    replace-one adjacency (sensitivity 2C: multiplier sigma/2). ``sampling: poisson`` is refused:
    the batches are fixed-size, and Poisson accounting of them (the common shortcut for shuffled
    batches) would report a lower ε than what runs. ``epsilon()`` is the worst client's ε so far;
    :meth:`client_epsilons` gives each client's.

    Args:
        noise_multiplier: sigma; null picks the smallest sigma for which a client that takes part in
            every round spends at most ``target_epsilon`` after ``federation.rounds`` rounds.
        max_grad_norm: C, the per-example gradient clipping bound.
        delta: the delta at which ε is reported.
        sampling: ``fixed`` (the only accepted value: fixed-size batches, see above).
        target_epsilon: budget; training stops before a round that could exceed it.
        per_sample_grads: ``auto`` (vmap, falling back to a per-example loop if the model cannot be
            vmapped), ``vmap`` or ``loop``.
    """

    name = "dp_sgd"
    per_sample: ClassVar[bool] = True
    batch_sampling: ClassVar[str] = "subsample"
    example_args = {"noise_multiplier": 1.0, "max_grad_norm": 1.0}

    def __init__(
        self,
        noise_multiplier: float | None = 1.0,
        max_grad_norm: float = 1.0,
        delta: float = 1e-5,
        sampling: Literal["fixed", "poisson"] = "fixed",
        target_epsilon: float | None = None,
        per_sample_grads: Literal["auto", "vmap", "loop"] = "auto",
    ) -> None:
        check_mechanism_args(
            "dp_sgd",
            noise_multiplier=noise_multiplier,
            delta=delta,
            bounds={"max_grad_norm": max_grad_norm},
            target_epsilon=target_epsilon,
            sampling=sampling,
        )
        if sampling == "poisson":
            raise ValueError(
                "dp_sgd sampling: poisson is refused: local training draws fixed-size batches (each step an "
                "independent uniform subset of batch_size examples), accounted exactly as sampling without "
                "replacement; Poisson accounting would report a lower epsilon than what runs. Use sampling: fixed"
            )
        if per_sample_grads not in ("auto", "vmap", "loop"):
            raise ValueError(f"dp_sgd per_sample_grads must be 'auto', 'vmap' or 'loop', got {per_sample_grads!r}")
        self.noise_multiplier = None if noise_multiplier is None else float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.delta = float(delta)
        self.sampling = sampling
        self.target_epsilon = target_epsilon
        self.per_sample_grads = per_sample_grads
        self.client_sizes: list[int] = []
        self.accountants: dict[int, Accountant] = {}
        self._round_steps: dict[int, dict[int, int]] = {}  # client -> {batch size: steps} this round
        self._generator: torch.Generator | None = None
        self._client: int | None = None
        self._vmap_failed = False
        self._plan: tuple[int, list[int]] | None = None  # (rounds, worst-case steps per client per round)

    # --- run binding ---------------------------------------------------------------------------------

    def bind_run(self, spec: RunSpec) -> None:
        self.client_sizes = list(spec.client_sizes)
        self._plan = (spec.rounds, list(spec.client_steps))
        self._batch_size = spec.batch_size
        if self.noise_multiplier is None:
            target = self.target_epsilon
            assert target is not None, "check_mechanism_args: noise_multiplier null needs target_epsilon"
            sigma = 0.0
            for n, steps in sorted(set(zip(self.client_sizes, spec.client_steps))):
                if n < 1:
                    continue
                b = min(spec.batch_size, n)
                # the event's multiplier is sigma/2 (replace-one, sensitivity 2C)
                sigma = max(sigma, 2 * noise_for_epsilon(target, self.delta, None, spec.rounds * steps, "fixed", n, b))
            self.noise_multiplier = sigma

    def check_model(self, model: nn.Module) -> None:
        for name, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
                raise ValueError(
                    f"dp_sgd: {name or 'model'} is a BatchNorm layer in training mode (trainable affine parameters); "
                    "its batch statistics mix examples, so per-example clipping bounds nothing. Freeze it "
                    "(a PEFT method other than `full`) or use a model with LayerNorm/GroupNorm"
                )

    # --- the private step -------------------------------------------------------------------------------

    def on_client_start(self, client_id: int, generator: torch.Generator) -> None:
        self._client, self._generator = client_id, generator

    def private_step(self, model: nn.Module, task: Task, batch: dict[str, Any]) -> StepOutput:
        """The DP-SGD step: a surrogate loss whose gradient is the clipped, noised mean gradient."""
        if self.noise_multiplier is None:
            raise RuntimeError("dp_sgd: noise_multiplier not set (bind_run picks it from target_epsilon)")
        grads, losses = self._grads(model, task, batch)
        size = int(losses.shape[0])
        clipped, _ = clip_per_sample(grads, self.max_grad_norm)
        generator = self._generator or torch.Generator().manual_seed(0)
        std = self.noise_multiplier * self.max_grad_norm
        private = {}
        for n, g in clipped.items():
            noise = torch.randn(g.shape[1:], generator=generator, dtype=torch.float32) * std
            private[n] = (g.sum(0).float() + noise.to(g.device)) / size
        params = dict(model.named_parameters())
        terms = [(params[n] * g.to(params[n].dtype)).sum() for n, g in private.items()]
        if not terms:
            raise ValueError("dp_sgd: the model has no trainable parameters to clip and noise")
        inner = sum(terms[1:], terms[0])
        loss = losses.mean()
        surrogate = loss.detach() + inner - inner.detach()
        client = self._client if self._client is not None else int(batch.get("client_id", torch.tensor([-1]))[0])
        self.record_steps(client, size, 1)
        dummy = torch.zeros(size)
        return StepOutput(surrogate, dummy, dummy)

    def _grads(self, model: nn.Module, task: Task, batch: dict[str, Any]):
        method = self.per_sample_grads
        if method == "auto":
            if self._vmap_failed:
                return per_sample_gradients(model, task, batch, "loop")
            try:
                return per_sample_gradients(model, task, batch, "vmap")
            except Exception:  # noqa: BLE001 - an unvmappable forward (data-dependent control flow, in-place ops)
                self._vmap_failed = True
                return per_sample_gradients(model, task, batch, "loop")
        return per_sample_gradients(model, task, batch, method)

    # --- accounting --------------------------------------------------------------------------------------

    def _sigma(self) -> float:
        """The noise multiplier, given or picked by :meth:`bind_run` before the first step."""
        assert self.noise_multiplier is not None, "bind_run() picks noise_multiplier from target_epsilon"
        return self.noise_multiplier

    def _compose(self, client: int, size: int, steps: int) -> None:
        acc = self.accountants.setdefault(client, Accountant("rdp"))
        n = self.client_sizes[client] if 0 <= client < len(self.client_sizes) else size
        n = max(n, size)
        acc.compose(self._sigma() / 2, None, steps, "fixed", n, size)  # replace-one: sensitivity 2C

    def record_steps(self, client: int, batch_size: int, steps: int) -> None:
        """Charge ``client`` this round for ``steps`` private steps on batches of ``batch_size`` (composed at
        round end). ``private_step`` calls it; an engine whose clients train elsewhere (Flower) calls it on
        the server from its own plan (each client's planned steps of ``min(batch_size, n)`` examples)."""
        counts = self._round_steps.setdefault(client, {})
        counts[batch_size] = counts.get(batch_size, 0) + steps

    def on_round_end(self) -> None:
        for client, counts in self._round_steps.items():
            for size, steps in counts.items():
                self._compose(client, size, steps)
        self._round_steps = {}
        self._client, self._generator = None, None

    def client_epsilons(self) -> dict[int, float]:
        """Each client's ε at ``delta`` over the steps it has taken so far."""
        return {c: acc.epsilon(self.delta) for c, acc in sorted(self.accountants.items())}

    def epsilon(self) -> float:
        eps = self.client_epsilons()
        return max(eps.values()) if eps else 0.0

    def would_exceed(self, next_rounds: int = 1) -> bool:
        """Whether a client that takes part in each of the next rounds could exceed ``target_epsilon``."""
        if self.target_epsilon is None or self._plan is None or self.noise_multiplier is None:
            return False
        _, client_steps = self._plan
        for client, n in enumerate(self.client_sizes):
            steps = client_steps[client] * next_rounds
            if n < 1 or steps < 1:
                continue
            probe = Accountant("rdp")
            if client in self.accountants:
                probe.load_state_dict(self.accountants[client].state_dict())
            saved, self.accountants[client] = self.accountants.get(client), probe
            try:
                self._compose(client, min(self._batch_size, n), steps)
                eps = probe.epsilon(self.delta)
            finally:
                if saved is None:
                    del self.accountants[client]
                else:
                    self.accountants[client] = saved
            if eps > self.target_epsilon:
                return True
        return False

    def metrics(self) -> dict[str, float]:
        eps = self.client_epsilons()
        if not eps:
            return {}
        return {"epsilon_client_mean": sum(eps.values()) / len(eps), "noise_multiplier": self._sigma()}

    # --- checkpointing -------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "noise_multiplier": self.noise_multiplier,
            "accountants": {str(c): acc.state_dict() for c, acc in self.accountants.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.noise_multiplier = state["noise_multiplier"]
        self.accountants = {}
        for c, acc_state in state["accountants"].items():
            acc = Accountant("rdp")
            acc.load_state_dict(acc_state)
            self.accountants[int(c)] = acc


@hookimpl
def fedlight_privacy() -> list[type]:
    return [DPSGD]
