"""The ``fedlight`` command: LightningCLI for fit/validate/test, plus ``plugins``.

Plugins are loaded before the parser is built, and every YAML document passes through
:func:`load_config`, which resolves plugin short names (``class_path: lora``) to import paths and
refuses unknown names with the list of available ones, before anything is instantiated.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import yaml

from fedlight.errors import ConfigError, StorageError

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

#: config keys whose value is a plugin, and the plugin kind they take
PLUGIN_KEYS: dict[str, str] = {
    "task": "tasks",
    "peft": "peft_methods",
    "dataset": "datasets",
    "partitioner": "partitioners",
    "aggregator": "aggregators",
    "privacy": "privacy",
    "uplink_codec": "codecs",
    "downlink_codec": "codecs",
    "attack": "attacks",
    "client_method": "client_methods",
    "inner": "codecs",
}

PARSER_MODE = "fedlight"


#: import-path prefixes a config may name outside the plugin registry (loggers, callbacks, optimizers);
#: extend with FEDLIGHT_ALLOWED_MODULES=pkg_a.,pkg_b. — jsonargparse alone would import anything
ALLOWED_MODULE_PREFIXES = ("fedlight.", "lightning.", "torch.optim.", "torchmetrics.")
ALLOWED_MODULES_ENV = "FEDLIGHT_ALLOWED_MODULES"


def _allowed_prefixes() -> tuple[str, ...]:
    extra = [p.strip() for p in os.environ.get(ALLOWED_MODULES_ENV, "").split(",") if p.strip()]
    return ALLOWED_MODULE_PREFIXES + tuple(extra)


def _resolve_class_path(name: str, kind: str | None, where: str) -> str:
    from fedlight.plugins import PluginError, get_registry

    registry = get_registry()
    if kind is not None:
        try:
            return registry.get(kind, name).import_path
        except PluginError as err:
            raise ConfigError(f"{where}: {err}") from None
    matches = {e.import_path for table in registry.entries.values() for e in table.values() if name == e.name}
    if len(matches) == 1:
        return matches.pop()
    if "." in name and not name.startswith(_allowed_prefixes()):
        registered = any(name == e.import_path for table in registry.entries.values() for e in table.values())
        if not registered:
            raise ConfigError(
                f"{where}: class_path {name!r} is neither a registered fedlight plugin nor under an allowed "
                f"module prefix {list(_allowed_prefixes())}; register it as a plugin or set "
                f"{ALLOWED_MODULES_ENV}={name.rsplit('.', 1)[0]}."
            )
    return name


def resolve_plugin_names(node: Any, path: str = "", kind: str | None = None) -> Any:
    """Rewrite plugin short names to import paths; refuse unknown plugins and unlisted import paths."""
    if isinstance(node, list):
        return [resolve_plugin_names(v, f"{path}[{i}]") for i, v in enumerate(node)]
    if isinstance(node, str) and (kind is not None or path.rsplit(".", 1)[-1] in ("optimizer", "lr_scheduler")):
        return _resolve_class_path(node, kind, path)
    if not isinstance(node, dict):
        return node
    out = dict(node)
    if isinstance(node.get("class_path"), str):
        out["class_path"] = _resolve_class_path(node["class_path"], kind, path)
    for key, value in node.items():
        if key != "class_path":
            out[key] = resolve_plugin_names(value, f"{path}.{key}" if path else str(key), PLUGIN_KEYS.get(key))
    return out


def load_config(text: str) -> Any:
    return resolve_plugin_names(yaml.safe_load(text))


def _make_cli_class():
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    from fedlight.core.round import FederatedRound

    class FedlightCLI(LightningCLI):
        """LightningCLI with the round callback as a top-level ``federation:`` section."""

        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            parser.add_lightning_class_args(FederatedRound, "federation")
            parser.link_arguments("federation.rounds", "trainer.max_epochs")

        def _parse_ckpt_path(self) -> None:
            # LightningCLI reads --ckpt_path before anything is built; check it first so a torn,
            # unsafe or missing checkpoint fails with fedlight's message instead of a torch traceback
            from fedlight.core.checkpoint import AtomicCheckpointIO

            subcommand = self.config.get("subcommand")
            ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
            if ckpt_path:
                AtomicCheckpointIO().load_checkpoint(ckpt_path)
            super()._parse_ckpt_path()

        def instantiate_classes(self) -> None:
            """Plugin constructors validate their arguments; report their errors as config errors."""
            try:
                super().instantiate_classes()
            except (ValueError, FileNotFoundError) as err:
                raise ConfigError(str(err)) from err

        def _add_configure_optimizers_method_to_model(self, subcommand: str | None) -> None:
            """A top-level ``optimizer:`` (and ``lr_scheduler:``) section, built when training starts.

            LightningCLI instantiates it over ``model.parameters()`` at parse time, but fedlight's model
            is built in ``setup`` (its head size comes from the data), so that list would be empty. The
            inits are captured here and instantiated in ``configure_optimizers`` over the trainable
            parameters.
            """
            from types import MethodType

            import lightning.pytorch.cli as lightning_cli

            instantiate, inits = lightning_cli.instantiate_class, []
            lightning_cli.instantiate_class = lambda args, init: inits.append(init)
            try:
                super()._add_configure_optimizers_method_to_model(subcommand)
            finally:
                lightning_cli.instantiate_class = instantiate
            if not inits:
                return
            optimizer_init, scheduler_init = inits[0], (inits[1] if len(inits) > 1 else None)
            cli = self

            def configure_optimizers(module):
                optimizer = instantiate([p for p in module.parameters() if p.requires_grad], optimizer_init)
                scheduler = instantiate(optimizer, scheduler_init) if scheduler_init else None
                return cli.configure_optimizers(module, optimizer, scheduler)

            self.model.configure_optimizers = MethodType(configure_optimizers, self.model)

        def instantiate_trainer(self, **kwargs: Any):
            """Swap Lightning's default TQDM bar for one that shows rounds, clients, MB and epsilon."""
            from lightning.pytorch.callbacks import TQDMProgressBar

            from fedlight.core.progress import FederatedProgressBar

            trainer = super().instantiate_trainer(**kwargs)
            for i, callback in enumerate(trainer.callbacks):
                if type(callback) is TQDMProgressBar:
                    trainer.callbacks[i] = FederatedProgressBar()
            return trainer

    return FedlightCLI


def trainer_defaults() -> dict[str, Any]:
    return {
        "reload_dataloaders_every_n_epochs": 1,  # each round has its own client batches
        "num_sanity_val_steps": 0,
        "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}},
        "enable_model_summary": False,
        "enable_checkpointing": False,  # fedlight writes its own round checkpoints (federation.checkpoint_every)
    }


def run_cli(args: list[str] | None = None, run: bool = True):
    """Build (and by default run) the LightningCLI; returns the CLI object."""
    import jsonargparse

    from fedlight.core.datamodule import FederatedDataModule
    from fedlight.core.module import FederatedModule

    jsonargparse.set_loader(PARSER_MODE, load_config, exceptions=(yaml.YAMLError,))
    cli_class = _make_cli_class()
    return cli_class(
        FederatedModule,
        FederatedDataModule,
        trainer_defaults=trainer_defaults(),
        parser_kwargs={"parser_mode": PARSER_MODE},
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def print_plugins(stream=None) -> None:
    from fedlight.plugins import KINDS, get_registry

    stream = stream or sys.stdout
    registry = get_registry()
    for kind in KINDS:
        print(f"{kind}:", file=stream)
        for name in registry.names(kind):
            entry = registry.entries[kind][name]
            print(f"  {name:<22} {entry.cls.summary()}  [{entry.provider}]", file=stream)
    for package, error in sorted(registry.failures.items()):
        print(f"failed to load plugin package {package}: {error.splitlines()[0]}", file=stream)
    print_plugin_packages(stream)


def print_plugin_packages(stream=None) -> None:
    """Installed packages in the ``fedlight`` entry-point group, with or without plugin classes (e.g. engines)."""
    import importlib.metadata

    from fedlight.plugins import ENTRY_POINT_GROUP, autoload_enabled

    if not autoload_enabled():
        return
    eps = sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.value)
    if eps:
        print("plugin packages:", file=stream or sys.stdout)
    for ep in eps:
        dist = ep.dist
        name, version = (dist.name, dist.version) if dist is not None else (ep.value, "")
        summary = dist.metadata.get("Summary", "") if dist is not None else ""
        print(f"  {name} {version:<10} {summary}  [{ep.name} = {ep.value}]", file=stream or sys.stdout)


def show_partitions(argv: list[str]) -> int:
    """``fedlight partitions --config x.yaml [--plot out.png]``: per-client histograms of the partition key."""
    from fedlight.report.partitions import show_partitions as show

    return show(argv)


def main(argv: list[str] | None = None) -> int:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plugins"]:
        print_plugins()
        return 0
    if argv[:1] == ["flower"]:  # the engine switch: the same YAML on Flower (plugins/fedlight-flower)
        try:
            from fedlight_flower.cli import main as flower_main
        except ImportError:
            print('fedlight: error: `fedlight flower` needs: pip install "fedlight-flower[simulation]"', file=sys.stderr)
            return 2
        return flower_main(argv[1:])
    if argv[:1] == ["partitions"]:
        try:
            return show_partitions(argv[1:])
        except ConfigError as err:
            print(f"fedlight: error: {err}", file=sys.stderr)
            return 2
    if argv[:1] == ["report"]:
        from fedlight.report.summary import main as report_main

        return report_main(argv[1:])
    if argv[:1] == ["evaluate"]:  # evaluation suites on an exported adapter, no training
        from fedlight.evaluators.run import main as evaluate_main

        try:
            return evaluate_main(argv[1:])
        except ConfigError as err:
            print(f"fedlight: error: {err}", file=sys.stderr)
            return 2
    try:
        run_cli(argv)
    except ConfigError as err:
        print(f"fedlight: error: {err}", file=sys.stderr)
        return 2
    except (StorageError, OSError) as err:  # a read-only, full or blocked run directory: one line, files intact
        from fedlight.core.storage import as_storage_error

        if (storage := as_storage_error(err)) is None:
            raise
        print(f"fedlight: error: {storage}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
