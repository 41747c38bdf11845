"""A fedlight job outside Lightning's round loop: what a Flower ServerApp and ClientApp both need.

Everything is built from the fedlight YAML by fedlight's own CLI (``run_cli(..., run=False)``), so the
task, PEFT method, data partition, codecs, privacy and aggregator are exactly those of ``fedlight fit``.
The only new code is :meth:`FedlightJob.local_fit`: one client's local steps without the Trainer
(candidate to move into ``fedlight.core.client``, see docs/flower.md).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from fedlight.core.client import ClientPipeline, ClientState
from fedlight.core.datamodule import ClientTaggedDataset, RoundBatchSampler, collate_with_client, resolve_seed
from fedlight.core.plan import RoundPlan
from fedlight.core.round import FederatedRound
from fedlight.core.server import ServerPipeline
from fedlight.core.state import State
from fedlight.core.update import ClientUpdate
from fedlight.errors import ConfigError
from fedlight.privacy.base import Privacy

#: ``federation:`` options the Flower engine runs as ``fedlight fit`` does; any other option must keep its
#: default (new round-loop features are refused until the bridge implements them, never silently ignored)
SUPPORTED_OPTIONS = frozenset(
    {
        "rounds", "clients_per_round", "local_steps", "local_epochs", "aggregator", "uplink_codec",
        "downlink_codec", "privacy", "seed", "eval_before_training", "faults", "max_update_norm",
        "client_sampling", "compute_tiers",
        "checkpoint_every",  # no round checkpoints on Flower (the run has no resume): ignored
    }
)  # fmt: skip


def check_supported(options: Any, federation: FederatedRound) -> None:
    """Raise ConfigError for a ``federation:`` option set away from its default that the bridge cannot run."""
    import inspect

    defaults = {
        name: p.default for name, p in inspect.signature(FederatedRound.__init__).parameters.items() if name != "self"
    }
    missing = object()
    for name, default in defaults.items():
        value = options.get(name, missing) if options is not None else missing
        if name in SUPPORTED_OPTIONS or value is missing:
            continue
        if value is None or value == default or (default is None and value in (0, 0.0, False, {}, [])):
            continue
        if isinstance(default, (int, float, str, bool)) and value == default:
            continue
        raise ConfigError(
            f"federation.{name} is not supported by fedlight-flower yet (got {value!r}); "
            f"run this config with `fedlight fit`, or remove federation.{name}"
        )
    aggregator = federation.aggregator
    if getattr(aggregator, "merges_into_base", False):
        raise ConfigError(
            f"federation.aggregator {aggregator.name!r} merges into the frozen base weights, which fedlight-flower "
            "does not broadcast yet; use `fedlight fit` or another aggregator"
        )
    privacy = federation.privacy
    if getattr(privacy, "per_sample", False) or type(privacy).on_client_start is not Privacy.on_client_start:
        raise ConfigError(
            f"federation.privacy {privacy.name!r} acts inside local training, which fedlight-flower does not run "
            "yet; use `fedlight fit`, or a client-level mechanism (dp_fedavg, local_dp)"
        )


def round_generator(seed: int, round_idx: int, stream: int) -> torch.Generator:
    """Same streams as ``fedlight.core.round._generator`` (0: server, 1000 + k: client k)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + round_idx) * 31 + stream)


@dataclass
class LocalResult:
    trained: State
    local: State
    mean_loss: float
    steps: int


class FedlightJob:
    """Model, partitioned data and round callback of one fedlight config, ready for another engine."""

    def __init__(self, config: str | Path, overrides: list[str] | None = None) -> None:
        from fedlight.cli import run_cli

        self.config = str(config)
        args = ["--config", self.config, "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
        argv, sys.argv = sys.argv, sys.argv[:1]  # a Ray worker's own argv is not ours to parse
        try:
            self.cli = run_cli(args + list(overrides or []), run=False)
        finally:
            sys.argv = argv
        self.module = self.cli.model
        self.dm = self.cli.datamodule
        self.trainer = self.cli.trainer
        federation = [c for c in self.trainer.callbacks if isinstance(c, FederatedRound)]
        if not federation:
            raise ConfigError("fedlight-flower needs the `federation:` section")
        self.federation: FederatedRound = federation[0]
        check_supported(self.cli.config.get("federation"), self.federation)
        self.dm.setup("fit")
        self.module.build(self.dm.num_classes)
        self.module.to(self.device)
        # fedlight's own run set-up, exactly as `fedlight fit` does it (checks, client sampling, compute
        # tiers, privacy binding, LoRA-aware aggregation): the Trainer is given the data module as
        # Trainer.fit would, then FederatedRound.setup / on_fit_start run unchanged
        self.trainer.datamodule = self.dm
        self.dm.trainer = self.trainer
        self.module.trainer = self.trainer
        self.federation.setup(self.trainer, self.module, "fit")
        self.federation.on_fit_start(self.trainer, self.module)
        if getattr(self.module, "private_step", None) is not None:
            raise ConfigError(
                f"fedlight-flower does not run per-example privacy ({self.federation.privacy.name!r}) yet: "
                "use `fedlight fit`, or a client-level mechanism (dp_fedavg, local_dp)"
            )
        self.seed = resolve_seed(self.federation.seed)
        self.data_seed = resolve_seed(self.dm.seed)
        self.initial_local: State = self.module.peft.get_state(self.module.model, self.module.local_names)

    # --- shared facts ---------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        root = getattr(self.trainer.strategy, "root_device", None)
        return root if root is not None else torch.device("cpu")

    @property
    def client_pipeline(self) -> ClientPipeline:
        return self.federation.client

    @property
    def server_pipeline(self) -> ServerPipeline:
        return self.federation.server

    @property
    def rounds(self) -> int:
        return self.federation.rounds

    @property
    def num_clients(self) -> int:
        return self.dm.num_clients

    @property
    def shared_names(self) -> list[str]:
        return self.module.shared_names

    def initial_global(self) -> State:
        return self.module.peft.get_state(self.module.model, self.module.shared_names)

    def plan(self, round_idx: int) -> RoundPlan:
        """``FederatedRound.plan_for`` itself: same seed, round and sizes -> same clients and steps."""
        return self.federation.plan_for(round_idx)

    def backbone_fingerprint(self) -> str:
        """Digest of the frozen tensors: every process must hold the same backbone (same seed / weights)."""
        import hashlib

        digest = hashlib.sha256()
        for name, param in self.module.model.named_parameters():
            if not param.requires_grad:
                flat = param.detach().reshape(-1)
                sample = torch.cat([flat[:4096], flat[-4096:]]) if flat.numel() > 8192 else flat
                digest.update(name.encode())
                digest.update(str(tuple(param.shape)).encode())
                digest.update(sample.float().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    # --- client side ----------------------------------------------------------------------------

    def client_batches(self, round_idx: int, client_id: int, steps: int) -> DataLoader:
        """The batches fedlight's in-process loop gives this client in this round (same sampler)."""
        plan = RoundPlan(round_idx, (client_id,), (client_id,), (steps,))
        sampler = RoundBatchSampler(plan, self.dm.client_indices, self.dm.batch_size, self.data_seed)
        return DataLoader(
            ClientTaggedDataset(self.dm.splits.train),
            batch_sampler=sampler,
            collate_fn=partial(collate_with_client, self.module.task.collate),
        )

    def _fresh_optimizer(self) -> torch.optim.Optimizer:
        configured: Any = self.module.configure_optimizers()  # LightningCLI's optimizer: section included
        if isinstance(configured, dict):
            configured = configured["optimizer"]
        while isinstance(configured, (list, tuple)):
            configured = configured[0]
        return configured

    def local_fit(self, round_idx: int, client_id: int, steps: int, start: State, local: State | None) -> LocalResult:
        """One client's local training, as ``FederatedRound`` + Lightning's automatic optimisation do it."""
        module, peft = self.module, self.module.peft
        peft.set_state(module.model, start)
        peft.set_state(module.model, local if local is not None else self.initial_local)
        module.train()
        optimizer = self._fresh_optimizer()
        clip = self.trainer.gradient_clip_val
        params = [p for p in module.model.parameters() if p.requires_grad]
        losses: list[float] = []
        for batch in self.client_batches(round_idx, client_id, steps):
            batch = module.transfer_batch_to_device(batch, self.device, 0)
            optimizer.zero_grad(set_to_none=True)
            loss = module.task.step(module.model, batch).loss
            loss.backward()
            if clip:
                if self.trainer.gradient_clip_algorithm == "value":
                    torch.nn.utils.clip_grad_value_(params, clip)
                else:
                    torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
            losses.append(float(loss.detach()))
        optimizer.zero_grad(set_to_none=True)
        return LocalResult(
            trained=peft.get_state(module.model, module.shared_names),
            local=peft.get_state(module.model, module.local_names),
            mean_loss=sum(losses) / max(len(losses), 1),
            steps=len(losses),
        )

    def client_update(
        self, round_idx: int, client_id: int, start: State, result: LocalResult, client_state: ClientState
    ) -> ClientUpdate:
        """delta -> privacy -> error feedback -> encode: fedlight's own client pipeline."""
        return self.client_pipeline.finish(
            client_id,
            start,
            result.trained,
            num_examples=self.dm.client_sizes[client_id],
            generator=round_generator(self.seed, round_idx, 1000 + client_id),
            client_state=client_state,
            metrics={"train_loss": result.mean_loss},
        )

    # --- server side ----------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, global_state: State) -> dict[str, float]:
        """Validation metrics of a global state (the server's copy of the model, initial local tensors)."""
        module = self.module
        module.peft.set_state(module.model, global_state)
        module.peft.set_state(module.model, self.initial_local)
        loader = DataLoader(list(self.dm.splits.val), batch_size=self.dm.eval_batch_size, collate_fn=module.task.collate)
        return module.evaluate(loader)  # the same evaluation as the in-process round 0
