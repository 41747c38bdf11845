"""The ``fedlight`` command: LightningCLI for fit/validate/test, plus ``plugins``.

Plugins are loaded before the parser is built, and every YAML document passes through
:func:`load_config`, which resolves plugin short names (``class_path: lora``) to import paths and
refuses unknown names with the list of available ones, before anything is instantiated.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from typing import Any

import yaml

from fedlight import config_guard
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
    "features": "round_features",
    "evaluators": "evaluators",
}

PARSER_MODE = "fedlight"

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
#: how to install the engine subcommands fedlight knows of (any package can add one: hook ``fedlight_engines``)
ENGINE_HINTS = {"flower": 'pip install "fedlight-flower[simulation]"'}


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
    if "." in name:
        config_guard.check_import_path(name, where)
    return name


def resolve_plugin_names(node: Any, path: str = "", kind: str | None = None) -> Any:
    """Rewrite plugin short names to import paths; refuse unknown plugins and unlisted import paths."""
    if isinstance(node, list):
        return [resolve_plugin_names(v, f"{path}[{i}]", kind) for i, v in enumerate(node)]  # a list of plugins
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
    """The loader for every YAML document jsonargparse reads (config files and command-line values)."""
    cfg = config_guard.safe_load(text)
    config_guard.check_derived_keys(cfg)
    return resolve_plugin_names(cfg)


def resolve_cli_args(args: list[str]) -> list[str]:
    """Resolve plugin short names in command-line values exactly as in YAML.

    jsonargparse hands a command-line value to the loader without its key, so ``--federation.aggregator
    fedadam`` would not know it names an aggregator; the key is known here. Handles ``--key value``,
    ``--key=value``, ``--key+=value``, ``--x.class_path value`` and JSON/YAML dict values.
    """
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        out.append(arg)
        i += 1
        if not arg.startswith("--") or arg == "--":
            continue
        key, has_value, value = arg[2:].partition("=")
        if not has_value:
            if i >= len(args) or args[i].startswith("--"):
                continue
            value = args[i]
        parts = key.rstrip("+").split(".")
        kind = PLUGIN_KEYS.get(parts[-2] if parts[-1] == "class_path" and len(parts) > 1 else parts[-1])
        if kind is None or os.path.isfile(value):  # a file is loaded (and resolved) by jsonargparse itself
            continue
        where = key.rstrip("+").removesuffix(".class_path")
        resolved = resolve_plugin_names(config_guard.safe_load(value), where, kind)
        text = resolved if isinstance(resolved, str) else json.dumps(resolved)
        if has_value:
            out[-1] = f"--{key}={text}"
        else:
            out.append(text)
            i += 1
    return out


def _make_cli_class():
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, LRSchedulerTypeTuple
    from torch.optim import Optimizer

    from fedlight.core.round import FederatedRound

    class FedlightArgumentParser(LightningArgumentParser):
        """Parse errors become ConfigErrors that say what to change (close keys, allowed imports).

        Prefixes of option names are not accepted (``--federation.round`` is not ``--federation.rounds``):
        a typo gets a suggestion, as it does in YAML, instead of silently picking an option.
        """

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("allow_abbrev", False)
            super().__init__(*args, **kwargs)

        def error(self, message: str, ex: Exception | None = None):
            if not self.exit_on_error:  # jsonargparse is trying alternatives internally
                return super().error(message, ex)
            raise ConfigError(config_guard.explain(message, config_guard.parser_keys(self), ex)) from ex

    class FedlightCLI(LightningCLI):
        """LightningCLI with the round callback as a top-level ``federation:`` section."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("parser_class", FedlightArgumentParser)
            kwargs.setdefault("auto_configure_optimizers", False)  # fedlight links its own (add_arguments_to_parser)
            super().__init__(*args, **kwargs)

        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            parser.add_lightning_class_args(FederatedRound, "federation")
            parser.link_arguments("federation.rounds", "trainer.max_epochs")
            # a top-level optimizer:/lr_scheduler: section goes to the module, which builds it over the
            # trainable tensors when training starts (the model is built in setup: its head size comes
            # from the data, so LightningCLI's own instantiation at parse time would see no parameters)
            parser.add_optimizer_args((Optimizer,), link_to="model.optimizer")
            parser.add_lr_scheduler_args(LRSchedulerTypeTuple, link_to="model.lr_scheduler")

        def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
            """Parse, then check ``--ckpt_path`` early; never let its ``hyper_parameters`` reach the parser.

            LightningCLI would parse a checkpoint's ``hyper_parameters`` as config on top of the YAML
            (importing any class path they name and silently replacing values such as ``model.lr``).
            fedlight checkpoints never write them (no ``save_hyperparameters``); a checkpoint that
            carries them is loaded for its state only, and the config alone decides the run. The path
            is held back while LightningCLI would read the checkpoint and put back before the classes
            are instantiated (public hooks only: ``parse_arguments``, ``before_instantiate_classes``).
            """
            super().parse_arguments(parser, args)
            from fedlight.core.checkpoint import AtomicCheckpointIO

            subcommand = self.config.get("subcommand")
            self.held_ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
            if self.held_ckpt_path:
                checkpoint = AtomicCheckpointIO().load_checkpoint(self.held_ckpt_path)
                ignored = sorted(k for k in ("hyper_parameters", "datamodule_hyper_parameters") if checkpoint.get(k))
                if ignored:
                    from lightning.pytorch.utilities import rank_zero_warn

                    rank_zero_warn(
                        f"[fedlight] checkpoint {self.held_ckpt_path} carries {' and '.join(ignored)}; ignored: the "
                        "config decides every setting, and nothing in a checkpoint is parsed or imported"
                    )
                self.config[subcommand]["ckpt_path"] = None

        def before_instantiate_classes(self) -> None:
            if self.held_ckpt_path:
                self.config[self.config["subcommand"]]["ckpt_path"] = self.held_ckpt_path

        def instantiate_classes(self) -> None:
            """Plugin constructors validate their arguments; report their errors as config errors."""
            try:
                super().instantiate_classes()
            except (ValueError, FileNotFoundError) as err:
                raise ConfigError(config_guard.explain(str(err), err=err)) from err

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


class _DropTips(logging.Filter):
    """Lightning's advertising tips (litlogger, litmodels) say nothing about the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def quiet_lightning() -> None:
    """Drop the noise every run printed: unrelated tips, and LightningCLI's warning that ``args`` and
    ``sys.argv`` are both set (fedlight always passes the arguments it parsed itself)."""
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropTips) for f in log.filters):
        log.addFilter(_DropTips())
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")


def run_cli(args: list[str] | None = None, run: bool = True):
    """Build (and by default run) the LightningCLI; returns the CLI object."""
    import jsonargparse

    from fedlight.core.datamodule import FederatedDataModule
    from fedlight.core.module import FederatedModule

    quiet_lightning()
    jsonargparse.set_loader(PARSER_MODE, load_config, exceptions=(yaml.YAMLError,))
    config_guard.install()
    if args is not None:
        args = resolve_cli_args(list(args))
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
    """Every plugin by kind. Built-ins come from the generated index (no torch, Lightning or models
    imported); installed plugin packages' hook modules are imported to list their classes, and classes
    they register by ``"module:Class"`` path are listed from their source, without importing them."""
    import importlib.metadata

    from fedlight.plugin_index import BUILTINS
    from fedlight.plugins import BUILTIN_PROVIDER, ENTRY_POINT_GROUP, autoload_enabled, build_registry

    stream = stream or sys.stdout
    rows = {
        kind: {name: (summary, BUILTIN_PROVIDER) for name, _, summary in entries} for kind, entries in BUILTINS.items()
    }
    failures: dict[str, str] = {}
    if autoload_enabled() and list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)):
        registry = build_registry(builtins=False)
        failures = registry.failures
        for kind, table in registry.entries.items():
            for name, entry in table.items():
                rows[kind][name] = (entry.summary, entry.provider)
    for kind, listed in rows.items():
        print(f"{kind}:", file=stream)
        for name in sorted(listed):
            summary, provider = listed[name]
            print(f"  {name:<22} {summary}  [{provider}]", file=stream)
    for package, error in sorted(failures.items()):
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
        summary = (dist.metadata["Summary"] or "") if dist is not None else ""
        print(f"  {name} {version:<10} {summary}  [{ep.name} = {ep.value}]", file=stream or sys.stdout)


def show_partitions(argv: list[str]) -> int:
    """``fedlight partitions --config x.yaml [--plot out.png]``: per-client histograms of the partition key."""
    from fedlight.report.partitions import show_partitions as show

    return show(argv)


TOP_HELP = """usage: fedlight <command> [options]

Federated fine-tuning of foundation models with parameter-efficient methods (PyTorch Lightning).

commands:
  fit         train: one Lightning epoch == one federated round   (fedlight fit --config x.yaml)
  validate    evaluate a model on the validation split           (LightningCLI)
  test        evaluate a model on the test split                 (LightningCLI)
  predict     run prediction                                     (LightningCLI)
  plugins     list every registered plugin by kind, with the package that provides it
  partitions  per-client histograms of a config's partition     (fedlight partitions --help)
  report      summary and plots of a run directory              (fedlight report --help)
  evaluate    evaluation suites on an exported adapter, no training
  <engine>    another engine from a plugin package on the same YAML (e.g. `fedlight flower`)

`fedlight <command> --help` prints that command's options (for fit/validate/test/predict: every
config key, e.g. `fedlight fit --help`; `fedlight fit --print_config` prints a full config)."""


def main(argv: list[str] | None = None) -> int:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):  # the commands, without importing Lightning (``fit --help``: all options)
        print(TOP_HELP)
        return 0
    if argv[:1] == ["plugins"]:
        print_plugins()
        return 0
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
    if argv[:1] and not argv[0].startswith("-") and argv[0] not in LIGHTNING_SUBCOMMANDS:
        from fedlight.plugins import engine_commands  # another engine runs the same YAML (a plugin package)

        command = engine_commands().get(argv[0])
        if command is not None:
            return command(argv[1:])
        if argv[0] in ENGINE_HINTS:
            print(f"fedlight: error: `fedlight {argv[0]}` needs: {ENGINE_HINTS[argv[0]]}", file=sys.stderr)
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
