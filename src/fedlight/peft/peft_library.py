"""Hugging Face peft methods behind one thin base: typed args in, a peft config out.

Every class here only declares its typed ``__init__`` arguments and how they map onto its peft config
(:meth:`PeftLibraryMethod.config_kwargs`); the base resolves ``target`` presets (:mod:`fedlight.peft.targets`),
puts the task head into ``modules_to_save`` (unless ``head: frozen``), checks that the method can adapt
every targeted layer type, and calls :func:`peft.get_peft_model` -- on timm and transformers models alike.
A layer peft cannot adapt is a :class:`ValueError` at build time, before round 1.

Tried and left out (peft 0.21): see ``docs/peft.md``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

from fedlight.hookspecs import hookimpl
from fedlight.peft.base import HeadMode, PeftMethod, in_module
from fedlight.peft.targets import PRESETS, resolve_targets

if TYPE_CHECKING:  # peft is imported when a method is applied: a timm + BitFit run never pays for it
    import peft

#: layer kinds (class names) most peft weight-space tuners adapt: torch Linear and GPT-2's Conv1D
LINEAR = ("Linear", "Conv1D")


def _check_range(name: str, value: float, low: float, high: float | None = None) -> None:
    if value < low or (high is not None and value >= high):
        bound = f"[{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")


def exact_regex(names: list[str]) -> str:
    """A regex peft full-matches against module names, selecting exactly ``names``."""
    return "^(?:" + "|".join(re.escape(n) for n in names) + ")$"


class PeftLibraryMethod(PeftMethod):
    """Base of the HF-peft wrappers: builds the peft config from typed args, resolved targets and the head.

    Subclasses set ``config_class`` (a peft config class, or its name in :mod:`peft`: resolved when the
    config is built, so importing this module does not import peft) and implement :meth:`config_kwargs`;
    ``layer_types`` are the module class names the method can adapt (checked before peft is called, so
    the error names the layer); ``task_types`` maps a model to a peft ``task_type`` for methods that need one.
    """

    config_class: ClassVar[type | str] = "PeftConfig"
    layer_types: ClassVar[tuple[str, ...]] = LINEAR
    #: True when the adapted model computes exactly the base model's function before training
    identity_at_init: ClassVar[bool] = False

    def __init__(self, target: str | list[str] = "attention", head: HeadMode = "shared") -> None:
        super().__init__(head)
        self.target = target

    # --- what subclasses provide -------------------------------------------------------------------

    def config_kwargs(self, model: nn.Module, targets: list[str]) -> dict[str, Any]:
        """Method-specific peft config arguments (besides target_modules and modules_to_save)."""
        return {}

    def resolve(self, model: nn.Module, head_modules: list[str]) -> list[str] | None:
        """Full names of the modules to adapt (``None`` lets peft pick, e.g. for prompt methods)."""
        return resolve_targets(model, self.target, head_modules)

    def task_type(self, model: nn.Module) -> str | None:
        return None

    # --- written once ------------------------------------------------------------------------------

    def exact_targets(self) -> bool:
        """Whether targets are full names from a preset (matched exactly) rather than user suffixes."""
        return isinstance(self.target, str)

    def check_layers(self, model: nn.Module, targets: list[str]) -> None:
        exact = self.exact_targets()
        matched = [
            (n, type(m).__name__)
            for n, m in model.named_modules()
            if n and (n in targets if exact else any(n == t or n.endswith("." + t) for t in targets))
        ]
        if not matched:
            raise ValueError(f"PEFT method {self.name!r}: target modules {targets[:8]} match no module of this model")
        bad = [(n, t) for n, t in matched if t not in self.layer_types]
        if bad:
            shown = ", ".join(f"{n} ({t})" for n, t in bad[:5])
            raise ValueError(
                f"PEFT method {self.name!r} cannot adapt {len(bad)} targeted layer(s): {shown}; it supports "
                f"{', '.join(self.layer_types)} layers -- change `target` (e.g. 'attention' or a list of linear layers)"
            )

    def peft_config(self, model: nn.Module, head_modules: list[str]) -> peft.PeftConfig:
        targets = self.resolve(model, head_modules)
        kwargs: dict[str, Any] = {}
        if targets is not None:
            self.check_layers(model, targets)
            # full names from a preset become an anchored regex: peft's list matching is by suffix,
            # so e.g. "norm" would also catch "blocks.0.attn.norm"
            kwargs["target_modules"] = exact_regex(targets) if self.exact_targets() else targets
        task_type = self.task_type(model)
        if task_type is not None:
            kwargs["task_type"] = task_type
        if self.train_head and head_modules:
            kwargs["modules_to_save"] = list(head_modules)
        import peft

        config_class = getattr(peft, self.config_class) if isinstance(self.config_class, str) else self.config_class
        return config_class(**kwargs, **self.config_kwargs(model, targets or []))

    def prepare(self, model: nn.Module, head_modules: list[str]) -> nn.Module:
        import peft

        config = self.peft_config(model, head_modules)
        try:
            wrapped = peft.get_peft_model(model, config)
        except (ValueError, TypeError, RuntimeError, NotImplementedError, AttributeError, KeyError) as err:
            raise ValueError(
                f"peft could not apply {self.name!r} ({type(config).__name__}) to {type(model).__name__}: {err}"
            ) from err
        if not self.train_head:  # peft's SEQ_CLS models add the classifier to modules_to_save themselves
            for pname, param in wrapped.named_parameters():
                if in_module(pname, head_modules):
                    param.requires_grad_(False)
        return wrapped


# --- LoRA family ------------------------------------------------------------------------------------


class AdaLoRA(PeftLibraryMethod):
    """AdaLoRA (Zhang et al. 2023, arXiv:2303.10512): SVD-parameterised LoRA with an adaptive rank budget.

    Without the rank-allocation schedule (peft's ``update_and_allocate``, which needs global
    gradient statistics no federated client has) this trains the SVD-form adapter at ``init_r``;
    ``target_r`` is passed through for completeness.
    """

    name = "adalora"
    example_args = {"init_r": 2, "target_r": 1}
    config_class = "AdaLoraConfig"
    identity_at_init = True

    def __init__(
        self,
        init_r: int = 12,
        target_r: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        total_step: int = 1000,
        target: str | list[str] = "attention",
        head: HeadMode = "shared",
    ) -> None:
        super().__init__(target, head)
        if not 1 <= target_r <= init_r:
            raise ValueError(f"adalora needs 1 <= target_r <= init_r, got target_r={target_r}, init_r={init_r}")
        _check_range("adalora dropout", dropout, 0.0, 1.0)
        self.init_r, self.target_r, self.alpha, self.dropout, self.total_step = (
            init_r,
            target_r,
            alpha,
            dropout,
            total_step,
        )

    def config_kwargs(self, model, targets):
        return dict(
            init_r=self.init_r, target_r=self.target_r, lora_alpha=self.alpha, lora_dropout=self.dropout,
            total_step=self.total_step,
        )  # fmt: skip


class LoHa(PeftLibraryMethod):
    """LoHa (Hyeon-Woo et al. 2022, FedPara, arXiv:2108.06098): low-rank Hadamard-product weight updates."""

    name = "loha"
    example_args = {"r": 2, "alpha": 2}
    config_class = "LoHaConfig"
    layer_types = (*LINEAR[:1], "Conv2d", "Conv1d")
    identity_at_init = True

    def __init__(
        self,
        r: int = 8,
        alpha: float = 8.0,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        target: str | list[str] = "attention",
        head: HeadMode = "shared",
    ) -> None:
        super().__init__(target, head)
        _check_range("loha r", r, 1)
        self.r, self.alpha, self.rank_dropout, self.module_dropout = r, alpha, rank_dropout, module_dropout

    def config_kwargs(self, model, targets):
        return dict(r=self.r, alpha=self.alpha, rank_dropout=self.rank_dropout, module_dropout=self.module_dropout)


class LoKr(PeftLibraryMethod):
    """LoKr (Edalati et al. 2022, arXiv:2212.10650): Kronecker-product weight updates."""

    name = "lokr"
    example_args = {"r": 2, "alpha": 2}
    config_class = "LoKrConfig"
    layer_types = (*LINEAR[:1], "Conv2d", "Conv1d")
    identity_at_init = True

    def __init__(
        self,
        r: int = 8,
        alpha: float = 8.0,
        decompose_both: bool = False,
        decompose_factor: int = -1,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        target: str | list[str] = "attention",
        head: HeadMode = "shared",
    ) -> None:
        super().__init__(target, head)
        _check_range("lokr r", r, 1)
        self.r, self.alpha, self.decompose_both, self.decompose_factor = r, alpha, decompose_both, decompose_factor
        self.rank_dropout, self.module_dropout = rank_dropout, module_dropout

    def config_kwargs(self, model, targets):
        return dict(
            r=self.r, alpha=self.alpha, decompose_both=self.decompose_both, decompose_factor=self.decompose_factor,
            rank_dropout=self.rank_dropout, module_dropout=self.module_dropout,
        )  # fmt: skip


class VeRA(PeftLibraryMethod):
    """VeRA (Kopiczko et al. 2024, arXiv:2310.11454): shared frozen random projections, trained scaling vectors.

    The random projections are rebuilt from ``projection_prng_key`` on every client, so only the
    scaling vectors travel.
    """

    name = "vera"
    example_args = {"r": 4}
    config_class = "VeraConfig"
    layer_types = LINEAR
    identity_at_init = True

    def __init__(
        self,
        r: int = 256,
        d_initial: float = 0.1,
        dropout: float = 0.0,
        projection_prng_key: int = 0,
        target: str | list[str] = "attention",
        head: HeadMode = "shared",
    ) -> None:
        super().__init__(target, head)
        _check_range("vera r", r, 1)
        self.r, self.d_initial, self.dropout, self.projection_prng_key = r, d_initial, dropout, projection_prng_key

    def config_kwargs(self, model, targets):
        return dict(
            r=self.r, d_initial=self.d_initial, vera_dropout=self.dropout, projection_prng_key=self.projection_prng_key,
            save_projection=True,
        )  # fmt: skip


class RandLoRA(PeftLibraryMethod):
    """RandLoRA (Albert et al. 2025, arXiv:2502.00987): full-rank updates from frozen random bases, trained scales."""

    name = "randlora"
    example_args = {"r": 2}
    config_class = "RandLoraConfig"
    layer_types = LINEAR
    identity_at_init = True

    def __init__(
        self,
        r: int = 32,
        alpha: float = 640.0,
        sparse: bool = False,
        projection_prng_key: int = 0,
        target: str | list[str] = "attention",
        head: HeadMode = "shared",
    ) -> None:
        super().__init__(target, head)
        _check_range("randlora r", r, 1)
        self.r, self.alpha, self.sparse, self.projection_prng_key = r, alpha, sparse, projection_prng_key

    def config_kwargs(self, model, targets):
        return dict(
            r=self.r, randlora_alpha=self.alpha, sparse=self.sparse, projection_prng_key=self.projection_prng_key,
            save_projection=True,
        )  # fmt: skip


# --- activation scaling --------------------------------------------------------------------------------


class IA3(PeftLibraryMethod):
    """(IA)^3 (Liu et al. 2022, arXiv:2205.05638): learned vectors rescaling attention and feed-forward activations.

    Targets matching the ``mlp`` preset are peft ``feedforward_modules`` (their inputs are scaled);
    the others (attention) have their outputs scaled.
    """

    name = "ia3"
    config_class = "IA3Config"
    identity_at_init = True

    def __init__(self, target: str | list[str] = "attention+mlp", head: HeadMode = "shared") -> None:
        super().__init__(target, head)

    def config_kwargs(self, model, targets):
        ff = [
            t
            for t in targets
            if any(t == s or t.endswith("." + s) for s in PRESETS["mlp"]) and not t.endswith("attention.output.dense")
        ]
        return dict(feedforward_modules=exact_regex(ff) if self.exact_targets() else ff)


class LayerNormTuning(PeftLibraryMethod):
    """LayerNorm tuning (Zhao et al. 2024, arXiv:2312.11420): only the normalisation layers' scale and shift train.

    ``target: norms`` (default) selects every LayerNorm/RMSNorm outside the head.
    """

    name = "ln_tuning"
    config_class = "LNTuningConfig"
    layer_types = ("LayerNorm", "RMSNorm", "GroupNorm", "LlamaRMSNorm", "GPT2LayerNorm", "BertLayerNorm")
    identity_at_init = True

    def __init__(self, target: str | list[str] = "norms", head: HeadMode = "shared") -> None:
        super().__init__(target, head)

    def resolve(self, model, head_modules):
        if self.target != "norms":
            return resolve_targets(model, self.target, head_modules)
        names = [
            n for n, m in model.named_modules()
            if n and "norm" in type(m).__name__.lower() and any(True for _ in m.parameters(recurse=False))
            and not any(n == h or n.startswith(h + ".") for h in head_modules)
        ]  # fmt: skip
        if not names:
            raise ValueError(f"PEFT method {self.name!r}: this model has no normalisation layer with parameters")
        return names


# --- orthogonal / structured --------------------------------------------------------------------------


class OFT(PeftLibraryMethod):
    """OFT (Qiu et al. 2023, arXiv:2306.07280): block-diagonal orthogonal rotations of frozen weights.

    ``block_size`` must divide the input width of every targeted layer.
    """

    name = "oft"
    example_args = {"block_size": 4}
    config_class = "OFTConfig"
    layer_types = (LINEAR[0], "Conv2d")
    identity_at_init = True

    def __init__(
        self,
        block_size: int = 32,
        coft: bool = False,
        eps: float = 6e-5,
        block_share: bool = False,
        dropout: float = 0.0,
        target: str | list[str] = "attention",
        head: HeadMode = "shared",
    ) -> None:
        super().__init__(target, head)
        _check_range("oft block_size", block_size, 1)
        self.block_size, self.coft, self.eps, self.block_share, self.dropout = (
            block_size,
            coft,
            eps,
            block_share,
            dropout,
        )

    def config_kwargs(self, model, targets):
        return dict(
            r=0, oft_block_size=self.block_size, coft=self.coft, eps=self.eps, block_share=self.block_share,
            module_dropout=self.dropout,
        )  # fmt: skip


class BOFT(PeftLibraryMethod):
    """BOFT (Liu et al. 2024, arXiv:2311.06243): butterfly-factorised orthogonal fine-tuning."""

    name = "boft"
    example_args = {"block_size": 4, "n_butterfly_factor": 1}
    config_class = "BOFTConfig"
    layer_types = (LINEAR[0], "Conv2d")
    identity_at_init = True

    def __init__(
        self,
        block_size: int = 4,
        n_butterfly_factor: int = 1,
        dropout: float = 0.0,
        target: str | list[str] = "attention",
        head: HeadMode = "shared",
    ) -> None:
        super().__init__(target, head)
        _check_range("boft block_size", block_size, 1)
        self.block_size, self.n_butterfly_factor, self.dropout = block_size, n_butterfly_factor, dropout

    def config_kwargs(self, model, targets):
        return dict(
            boft_block_size=self.block_size, boft_block_num=0, boft_n_butterfly_factor=self.n_butterfly_factor,
            boft_dropout=self.dropout,
        )  # fmt: skip


class HRA(PeftLibraryMethod):
    """HRA (Yuan et al. 2024, arXiv:2405.17484): chains of Householder reflections adapting frozen weights."""

    name = "hra"
    example_args = {"r": 2}
    config_class = "HRAConfig"
    layer_types = (LINEAR[0], "Conv2d")
    identity_at_init = True

    def __init__(
        self, r: int = 8, apply_gs: bool = False, target: str | list[str] = "attention", head: HeadMode = "shared"
    ) -> None:
        super().__init__(target, head)
        _check_range("hra r", r, 1)
        self.r, self.apply_gs = r, apply_gs

    def config_kwargs(self, model, targets):
        return dict(r=self.r, apply_GS=self.apply_gs)


class MiSS(PeftLibraryMethod):
    """MiSS (Kang & Yin 2024, arXiv:2409.15371, formerly Bone): shard-shared block updates of frozen weights.

    ``r`` must divide the output width of every targeted layer.
    """

    name = "miss"
    example_args = {"r": 4}
    config_class = "MissConfig"
    layer_types = LINEAR[:1]
    identity_at_init = True

    def __init__(self, r: int = 64, target: str | list[str] = "attention", head: HeadMode = "shared") -> None:
        super().__init__(target, head)
        _check_range("miss r", r, 1)
        self.r = r

    def config_kwargs(self, model, targets):
        return dict(r=self.r)


class C3A(PeftLibraryMethod):
    """C3A (Chen et al. 2025, arXiv:2407.19342): block-circular convolution adapters.

    ``block_size`` must divide both widths of every targeted layer.
    """

    name = "c3a"
    example_args = {"block_size": 8}
    config_class = "C3AConfig"
    layer_types = LINEAR[:1]
    identity_at_init = False  # xavier-initialised kernels

    def __init__(self, block_size: int = 256, target: str | list[str] = "attention", head: HeadMode = "shared") -> None:
        super().__init__(target, head)
        _check_range("c3a block_size", block_size, 1)
        self.block_size = block_size

    def config_kwargs(self, model, targets):
        return dict(block_size=self.block_size)


# --- sparse / spectral ---------------------------------------------------------------------------------


class FourierFT(PeftLibraryMethod):
    """FourierFT (Gao et al. 2024, arXiv:2405.03003): a few trained spectral coefficients per weight update.

    The frequency locations come from ``random_loc_seed``, identical on every client, so only the
    ``n_frequency`` coefficients per layer travel.
    """

    name = "fourierft"
    example_args = {"n_frequency": 16, "scaling": 10.0}
    config_class = "FourierFTConfig"
    layer_types = LINEAR

    def __init__(
        self,
        n_frequency: int = 1000,
        scaling: float = 150.0,
        random_loc_seed: int = 777,
        target: str | list[str] = "attention",
        head: HeadMode = "shared",
    ) -> None:
        super().__init__(target, head)
        _check_range("fourierft n_frequency", n_frequency, 1)
        self.n_frequency, self.scaling, self.random_loc_seed = n_frequency, scaling, random_loc_seed

    def config_kwargs(self, model, targets):
        return dict(n_frequency=self.n_frequency, scaling=self.scaling, random_loc_seed=self.random_loc_seed)


class SHiRA(PeftLibraryMethod):
    """SHiRA (Bhardwaj et al. 2024, arXiv:2406.13175): a fixed sparse subset of each weight trains.

    The random mask is seeded by ``random_seed`` so every client trains the same entries; ``r``
    sets the number of trained entries to that of a rank-``r`` LoRA.
    """

    name = "shira"
    example_args = {"r": 2}
    config_class = "ShiraConfig"
    layer_types = LINEAR[:1]
    identity_at_init = True

    def __init__(
        self, r: int = 32, random_seed: int = 0, target: str | list[str] = "attention", head: HeadMode = "shared"
    ) -> None:
        super().__init__(target, head)
        _check_range("shira r", r, 1)
        self.r, self.random_seed = r, random_seed

    def config_kwargs(self, model, targets):
        return dict(r=self.r, mask_type="random", random_seed=self.random_seed)


#: LoRA itself lives in fedlight.peft.lora (its historical import path) and registers there
METHODS: list[type[PeftLibraryMethod]] = [
    AdaLoRA, LoHa, LoKr, VeRA, RandLoRA, IA3, LayerNormTuning, OFT, BOFT, HRA, MiSS, C3A, FourierFT, SHiRA,
]  # fmt: skip


@hookimpl
def fedlight_peft_methods() -> list[type]:
    return list(METHODS)
