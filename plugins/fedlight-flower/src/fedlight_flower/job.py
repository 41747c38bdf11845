"""A fedlight job for the Flower apps: the parsed config's RoundEngine, bound to its model and data.

Everything is built from the fedlight YAML by fedlight's own CLI (``run_cli(..., run=False)``), so the
task, PEFT method, data partition, codecs, privacy, aggregator and round features are exactly those of
``fedlight fit``: the job takes the ``federation:`` callback's :class:`~fedlight.core.engine.RoundEngine`,
binds it to the population and data (``engine.bind``) and to the model (``engine.attach``), as the
Lightning callback does, and never calls a Lightning hook. The ServerApp drives the engine's server
half (``begin_round`` / ``end_round`` / ``round_row``); each ClientApp drives a client-only engine from
the same config (``receive_round`` then :func:`fedlight.core.local.train_client`).

What cannot run here is refused before round 1 by :func:`check_remote`, from capabilities the plugin
classes declare (never by name), with the reason in the message.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from fedlight.core.checkpoint import AtomicCheckpointIO
from fedlight.core.client import ClientState
from fedlight.core.datamodule import ClientTaggedDataset, RoundBatchSampler, collate_with_client
from fedlight.core.engine import Population, RoundEngine
from fedlight.core.local import train_client
from fedlight.core.plan import RoundPlan
from fedlight.core.round import FederatedRound
from fedlight.core.round_callbacks import check_trainer
from fedlight.core.seeds import resolve_seed
from fedlight.core.state import State
from fedlight.core.update import ClientUpdate
from fedlight.errors import CheckpointError, ConfigError
from fedlight.privacy.base import Privacy

#: the trainer precisions ``train_client`` reproduces (it runs no precision plugin / autocast)
FP32_PRECISIONS = ("32-true", "32", 32)


def _refuse(option: str, why: str) -> ConfigError:
    return ConfigError(f"{option} cannot run on fedlight-flower: {why}; run this config with `fedlight fit`")


def check_remote(federation: FederatedRound, trainer: Any) -> None:
    """Refuse, before round 1, what a Flower deployment (clients in processes of their own) cannot run.

    Each rule reads a capability of the configured plugin, so a third-party plugin that declares the
    same capability as a built-in is treated the same. ``core.compat.check`` has already run (the
    ``federation:`` options were validated when the callback was built).
    """
    o = federation.options
    privacy = o.privacy
    in_training = privacy.per_sample or type(privacy).on_client_start is not Privacy.on_client_start
    if in_training and not callable(getattr(privacy, "record_steps", None)):
        raise _refuse(
            f"federation.privacy {privacy.name!r}",
            "it acts inside local training and its accountant counts each client's private steps there, on "
            "the client, where the server's accountant never sees them; a mechanism that offers "
            "`record_steps(client, batch_size, steps)` (dp_sgd) is charged on the server from its plan",
        )
    engine: RoundEngine = federation.engine
    for feature in engine.features:
        if not feature.reads_client_store:
            continue
        if not getattr(feature, "client_evaluation", False):
            raise _refuse(
                f"round feature {feature.name!r}",
                "it reads clients' state (e.g. their local tensors) on the server, and on Flower that state "
                "never leaves the clients; a feature that declares `client_evaluation` (and its clients_due / "
                "client_metrics / report) is asked of the clients instead",
            )
    if trainer.precision not in FP32_PRECISIONS:
        raise _refuse(
            f"trainer.precision {trainer.precision!r}",
            "local training on Flower runs without Lightning's precision plugin (autocast / loss scaling)",
        )


def _optimizer_of(configured: Any) -> torch.optim.Optimizer:
    """The optimizer of ``configure_optimizers()``; a learning-rate scheduler is refused (Lightning steps it)."""
    if isinstance(configured, dict):
        if configured.get("lr_scheduler") is not None:
            raise _refuse("lr_scheduler", "a scheduler is stepped by Lightning's loop across rounds")
        configured = configured["optimizer"]
    if isinstance(configured, (list, tuple)) and len(configured) == 2 and isinstance(configured[1], (list, tuple)):
        if configured[1]:
            raise _refuse("lr_scheduler", "a scheduler is stepped by Lightning's loop across rounds")
        configured = configured[0]
    while isinstance(configured, (list, tuple)):
        if len(configured) != 1:
            raise _refuse("configure_optimizers", "several optimizers need Lightning's manual optimisation")
        configured = configured[0]
    return configured


class FedlightJob:
    """Model, partitioned data and round engine of one fedlight config, for the ServerApp or a ClientApp.

    ``resume``: a round checkpoint written by :meth:`save_checkpoint`; the engine's state is loaded
    between ``bind`` and ``attach``, the order ``fedlight fit --ckpt_path`` uses.
    """

    def __init__(
        self, config: str | Path, overrides: list[str] | None = None, resume: str | Path | None = None
    ) -> None:
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
        self.engine: RoundEngine = self.federation.engine
        check_remote(self.federation, self.trainer)
        self.dm.setup("fit")
        check_trainer(self.trainer, self.federation.options, self.dm)
        self.module.build(self.dm.num_classes)
        self.module.to(self.device)
        # what the module reads outside Lightning's loops (the validation split for generative metrics),
        # as Trainer.fit would link them; no Lightning hook is called
        self.trainer.datamodule = self.dm
        self.dm.trainer = self.trainer
        self.module.trainer = self.trainer
        _optimizer_of(self.module.configure_optimizers())  # a scheduler fails now, not in a client's round
        self.population = Population(tuple(self.dm.client_sizes), self.dm.batch_size)
        self.data_seed = resolve_seed(self.dm.seed)
        self.start_round = 1
        #: (node context, SecAgg party) of the client training now, saved back after its masked upload
        self.secure_party: Any = None
        self.backbone_fingerprint()  # of the weights as built, before a resumed run's merged base is loaded
        try:
            self.engine.bind(self.population, self.dm)
            if resume is not None:
                self._load_checkpoint(Path(resume))
            self.engine.attach(self.module)
        except ValueError as err:
            raise ConfigError(str(err)) from err

    # --- shared facts ---------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        root = getattr(self.trainer.strategy, "root_device", None)
        return root if root is not None else torch.device("cpu")

    @property
    def rounds(self) -> int:
        return self.engine.schedule.rounds

    @property
    def num_clients(self) -> int:
        return self.dm.num_clients

    @property
    def shared_names(self) -> list[str]:
        return self.module.shared_names

    def backbone_fingerprint(self) -> str:
        """Digest of the frozen tensors as loaded (every process must hold the same backbone)."""
        import hashlib

        if not hasattr(self, "_fingerprint"):  # before any base merging changes them on this process
            digest = hashlib.sha256()
            for name, param in self.module.model.named_parameters():
                if not param.requires_grad:
                    flat = param.detach().reshape(-1)
                    sample = torch.cat([flat[:4096], flat[-4096:]]) if flat.numel() > 8192 else flat
                    digest.update(name.encode())
                    digest.update(str(tuple(param.shape)).encode())
                    digest.update(sample.float().cpu().numpy().tobytes())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def client_state_kinds(self) -> list[str]:
        """What this config keeps per client between rounds (in Flower's node state, not in the server's checkpoint)."""
        o, kinds = self.federation.options, []
        if self.module.local_names:
            kinds.append("local tensors")
        if o.uplink_codec.error_feedback:
            kinds.append("error-feedback residuals")
        if o.client_method is not None:
            kinds.append(f"client_method {o.client_method.name!r} state")
        return kinds

    # --- client side ----------------------------------------------------------------------------

    def client_batches(self, plan: RoundPlan, data_seed: int) -> DataLoader:
        """The batches ``fedlight fit`` gives this one-client plan's client (the same sampler and seed)."""
        sampler = RoundBatchSampler(plan, self.dm.client_indices, self.dm.batch_size, data_seed)
        return DataLoader(
            ClientTaggedDataset(self.dm.splits.train),
            batch_sampler=sampler,
            collate_fn=partial(collate_with_client, self.module.task.collate),
        )

    def fresh_optimizer(self) -> torch.optim.Optimizer:
        return _optimizer_of(self.module.configure_optimizers())  # LightningCLI's optimizer: section included

    def train(
        self,
        plan: RoundPlan,
        payload: bytes,
        broadcasts: dict[str, bytes],
        client_state: ClientState,
        seed: int,
        data_seed: int,
    ) -> tuple[ClientUpdate | None, State | None, ClientState]:
        """One client's round on a client-only engine: ``(update or None, held, its new client state)``.

        ``plan`` names one client (lost or not, as the server planned it); ``payload``/``broadcasts``
        are the server's ``begin_round`` output. The server's seeds win over this process's config, so
        batches, masks and noise are those of ``fedlight fit``. ``held``: the trained shared tensors
        when a feature held the update back (``hold_update``: a malicious client); the server's own
        feature then crafts and sends it at ``before_aggregate``, as in-process (colluding attackers
        need each other's deltas, which only the server holds), else None.
        """
        engine = self.engine
        (client_id,) = plan.training
        if seed != engine.seed:  # the malicious set, compute tiers, … follow the server's seed
            engine.seed = seed
            engine.bind(self.population, self.dm)
        round = engine.receive_round(plan, payload, broadcasts)
        engine.client_store = {client_id: client_state} if client_state else {}
        update = train_client(
            engine,
            client_id,
            self.client_batches(plan, data_seed),
            self.fresh_optimizer,
            transfer=lambda batch: self.module.transfer_batch_to_device(batch, self.device, 0),
            clip_val=self.trainer.gradient_clip_val,
            clip_algorithm=self.trainer.gradient_clip_algorithm or "norm",
        )
        held = None
        session = getattr(engine.client, "session", None)
        declined = session is not None and session.current().failure is not None  # a failed SecAgg round
        if update is None and client_id not in round.failed and client_id not in plan.lost and not declined:
            # a feature held it
            held = self.module.peft.get_state(self.module.model, engine.shared_names)  # as finish_client left it
        return update, held, engine.client_store.get(client_id, {})

    def client_start(self, client_id: int) -> State:
        """What ``client_id`` started from this round (the engine's ``start_client`` view of the broadcast)."""
        r = self.engine.round
        if r.received is None:
            r.received = self.engine.client.receive(r.payload)
        return self.engine.server.aggregator.client_view(dict(r.received), client_id)

    def hold(self, client_id: int, trained: State) -> bool:
        """Server side: a client's held update joins the round as ``finish_client`` holds it in-process (the
        first feature whose ``hold_update`` takes it sends it at ``before_aggregate``); False: none takes it."""
        from fedlight.core.engine import ClientRun

        run = ClientRun(client_id, self.client_start(client_id))
        return any(f.hold_update(self.engine, run, dtype_like(trained, self.module)) for f in self.engine.features)

    # --- server side ----------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation metrics of the model as the engine left it (new global state, initial local tensors)."""
        module = self.module
        loader = DataLoader(
            list(self.dm.splits.val), batch_size=self.dm.eval_batch_size, collate_fn=module.task.collate
        )
        return module.evaluate(loader)  # the same evaluation as `fedlight fit`'s validation

    def save_checkpoint(self, path: Path) -> None:
        """The server's run state after round ``r``: the engine's ``state_dict`` (tensors and plain values
        only) and the frozen weights a merging aggregator changed; written atomically, loaded pickle-free."""
        params = dict(self.module.model.named_parameters())
        state = {
            "fedlight_flower": 1,
            "round": self.engine.round.round,
            "config": self.config,
            "engine": self.engine.state_dict(),
            "frozen": {n: params[n].detach().clone() for n in sorted(self.module.kept_frozen)},
        }
        AtomicCheckpointIO().save_checkpoint(state, path)

    def _load_checkpoint(self, path: Path) -> None:
        state = AtomicCheckpointIO().load_checkpoint(path)  # weights_only=True: a checkpoint cannot run code
        if not isinstance(state, dict) or state.get("fedlight_flower") != 1:
            raise CheckpointError(f"{path} is not a fedlight-flower round checkpoint (fedlight fit writes its own)")
        self.engine.load_state_dict(state["engine"])
        params = dict(self.module.model.named_parameters())
        with torch.no_grad():
            for name, value in state["frozen"].items():
                if name not in params or params[name].shape != value.shape:
                    raise CheckpointError(f"{path}: merged base weight {name} does not fit this model")
                params[name].copy_(value)
        peft, model = self.module.peft, self.module.model
        peft.set_state(model, self.engine.global_state)
        peft.set_state(model, self.engine.initial_local)
        self.start_round = int(state["round"]) + 1


def dtype_like(state: State, module: Any) -> State:
    """``state`` in the dtypes of ``module``'s parameters (fp32 arrays on the wire; numpy has no bf16)."""
    params = dict(module.model.named_parameters())
    return {n: v.to(params[n].dtype) if n in params else v for n, v in state.items()}
