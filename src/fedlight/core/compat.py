"""Which plugins may be combined, decided from the capabilities their classes declare.

One module for every cross-plugin rule, called by every engine before round 1 (the Lightning
callback and the Flower bridge), so a rule is written once and a third-party plugin that declares
the same capability as a built-in is treated exactly like it. No rule here names a plugin.

Capabilities read here (class attributes or methods of the plugin kinds):

* aggregators: ``sum_based`` (needs only the mean delta, so it can run on a secure sum),
  ``uniform_mean()`` (the new global state is the old one plus the unweighted mean delta),
  ``per_client_views`` (each client trains a restricted view, e.g. per-client LoRA ranks),
  ``merges_into_base``;
* codecs: ``passthrough`` (encodes tensors as they are: nothing to compress or lose);
* privacy: ``requires_uniform_mean``, ``protects_updates``, ``per_sample``, ``secure_aggregation_problem()``;
* client methods: ``sends_extra``, ``respects_client_views``;
* round features: ``acts_in_local_training``, ``groupable``;
* optimizers: elementwise (:data:`ELEMENTWISE_OPTIMIZERS`), for grouped execution;
* tasks: ``quantized`` (the frozen base is 8/4-bit), with the peft method's ``merges_into_base`` and the
  tensors it left trainable (:func:`check_model`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Composition:
    """The plugins and options of one run that the rules look at."""

    aggregator: Any
    privacy: Any
    uplink_codec: Any
    client_method: Any = None
    secure_aggregation: Any = None
    max_update_norm: float | None = None
    clients_per_round: int = 1
    client_sampling: str = "uniform"
    features: tuple[Any, ...] = field(default=())


def check(c: Composition) -> None:
    """Raise ValueError, naming the option to change, for a combination that cannot be sound."""
    aggregator, privacy, method = c.aggregator, c.privacy, c.client_method
    if privacy.requires_uniform_mean and not aggregator.uniform_mean():
        raise ValueError(
            f"federation.privacy {privacy.name!r} calibrates its noise to an unweighted mean of clipped updates: "
            "use federation.aggregator: {class_path: fedavg, init_args: {weighting: uniform}}"
        )
    if method is not None and method.sends_extra and privacy.protects_updates:
        raise ValueError(
            f"federation.client_method {method.name!r} sends extra tensors that federation.privacy "
            f"{privacy.name!r} does not protect; use privacy: none or another client_method"
        )
    if method is not None and not method.respects_client_views and aggregator.per_client_views:
        raise ValueError(
            f"federation.client_method {method.name!r} cannot be combined with federation.aggregator "
            f"{aggregator.name!r}, whose clients train a restricted view of the global state (per-client ranks); "
            "use fedprox or another aggregator"
        )
    if c.secure_aggregation is not None:
        check_secure(c)


def check_secure(c: Composition) -> None:
    """The composition matrix of secure aggregation (docs/privacy.md)."""
    where = "federation.secure_aggregation"
    aggregator, privacy, method = c.aggregator, c.privacy, c.client_method
    if not aggregator.sum_based:
        raise ValueError(
            f"{where}: aggregator {aggregator.name!r} needs every individual update, which the server never sees "
            "under secure aggregation (robust aggregation cannot run on a masked sum); use a mean-based aggregator "
            "(fedavg, fedavgm, fedadam, fedyogi, fedadagrad), or drop secure_aggregation"
        )
    if getattr(aggregator, "weighting", "uniform") != "uniform":
        raise ValueError(f"{where}: the secure sum is an unweighted sum; set the aggregator's weighting: uniform")
    if c.max_update_norm is not None:
        raise ValueError(
            f"{where}: federation.max_update_norm checks each update on the server, which only sees the masked sum; "
            "set it to null (bound updates on the client with a clipping privacy plugin such as dp_fedavg)"
        )
    if not c.uplink_codec.passthrough:
        raise ValueError(
            f"{where}: uplink_codec {c.uplink_codec.name!r} cannot compress masked ring elements; "
            "use uplink_codec: identity"
        )
    problem = privacy.secure_aggregation_problem()
    if problem:
        raise ValueError(f"{where}: federation.privacy {privacy.name!r} {problem}")
    if method is not None and method.sends_extra:
        raise ValueError(
            f"{where}: client_method {method.name!r} sends extra per-client tensors in the clear; "
            "they would bypass secure aggregation"
        )
    if c.clients_per_round < 2:
        raise ValueError(f"{where}: needs clients_per_round >= 2 (the sum of one client is its update)")


def check_model(task: Any, peft: Any, model: Any, aggregator: Any = None) -> None:
    """Rules between the task's base model, the PEFT method and the aggregator, run on the built model.

    A quantized base (``task.quantized``) is frozen: no trainable tensor may be quantized (full
    fine-tuning, a method that unfreezes quantized weights), and nothing may fold updates into it
    (a PEFT method or aggregator declaring ``merges_into_base``). Trained float tensors on a quantized
    base (LoRA factors, the task head, BitFit's biases) are fine.
    """
    if not getattr(task, "quantized", False):
        return
    from fedlight.core.quantized import is_quantized

    method = task.quantization.method if getattr(task, "quantization", None) is not None else "quantized"
    where = f"model.task.init_args.quantization ({method})"
    trained = [n for n, p in model.named_parameters() if p.requires_grad and is_quantized(p)]
    if trained:
        raise ValueError(
            f"{where}: PEFT method {peft.name!r} trains {len(trained)} quantized base tensors (e.g. {trained[:3]}), "
            "which cannot take gradient steps; use an adapter method (lora, dora, ia3, ...) on the quantized base, "
            "or drop quantization to fine-tune the base"
        )
    if getattr(peft, "merges_into_base", False):
        raise ValueError(f"{where}: PEFT method {peft.name!r} folds updates into the frozen quantized base; use lora")
    if aggregator is not None and getattr(aggregator, "merges_into_base", False):
        raise ValueError(
            f"{where}: federation.aggregator {aggregator.name!r} merges updates into the frozen base, which is "
            "quantized here; use a non-merging aggregator (fedavg, fedadam, ...) or drop quantization"
        )


#: optimizers whose update of each tensor element depends on that element's gradient history only, so
#: one optimizer over stacked client slots equals one optimizer per client (grouped execution)
ELEMENTWISE_OPTIMIZERS = frozenset({"SGD", "Adam", "AdamW", "Adamax", "Adagrad", "RMSprop", "NAdam", "RAdam"})


def grouping_blocker(module: Any, privacy: Any, features: Any, optimizer: Any) -> str | None:
    """Why this run's clients cannot train stacked in one vectorised step (grouped execution), or None.

    Read from capabilities: a privacy mechanism acting per example inside local training (DP-SGD), a
    round feature that is not ``groupable``, an optimizer that is not elementwise (:data:`ELEMENTWISE_OPTIMIZERS`,
    by the ``torch.optim`` class it derives from), and BatchNorm layers in train mode (their running
    statistics are one in-place buffer, not one per client).
    """
    import torch

    if privacy.per_sample:
        return f"federation.privacy {privacy.name!r} acts per example inside local training"
    for feature in features:
        if not feature.groupable:
            return f"round feature {feature.name!r} keeps the current client's state between local steps"
    bases = {c.__name__ for c in type(optimizer).__mro__ if c.__module__.startswith("torch.optim")}
    if not bases & ELEMENTWISE_OPTIMIZERS:
        return f"optimizer {type(optimizer).__name__} is not one of the elementwise {sorted(ELEMENTWISE_OPTIMIZERS)}"
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training for m in module.net.modules()):
        return "the model has BatchNorm layers in train mode (trainable BatchNorm keeps one set of running statistics)"
    return None
