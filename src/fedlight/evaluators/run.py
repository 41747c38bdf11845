"""``fedlight evaluate``: run a config's evaluation suites on an exported adapter (or the bare base), no training."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fedlight.errors import ConfigError


def evaluate_adapter(
    config: str | Path, adapter: str | Path | None = None
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Metrics (``<label>_<metric>``) and samples of the config's ``model.evaluators`` on base + adapter.

    The base is the config's ``model.task`` model; ``adapter`` is a directory written by
    ``federation.export_every`` (peft or fedlight layout, loaded with :func:`fedlight.core.export.load_adapter`);
    without it the base itself is scored (the before-training baseline).
    """
    import tempfile

    import yaml

    from fedlight.cli import run_cli
    from fedlight.core.export import ADAPTER_JSON, load_adapter, read_adapter_info

    try:
        cfg = yaml.safe_load(Path(config).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read the config {str(config)!r}: {err}") from None
    for key in ("ckpt_path", "weights_only"):  # a saved `fit` config has options of the fit subcommand
        cfg.pop(key, None)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(cfg))
        cli = run_cli(["--config", str(path), "--trainer.logger", "false"], run=False)
    module = cli.model
    if not module.evaluators:
        raise ConfigError(
            f"{config}: no model.evaluators to run; add e.g. {{class_path: multiple_choice, init_args: {{path: ...}}}}"
        )
    num_classes = 0
    if adapter is not None:
        adapter = Path(adapter)
        if not (adapter / ADAPTER_JSON).is_file():
            raise ConfigError(
                f"--adapter {str(adapter)!r} has no {ADAPTER_JSON}: not a fedlight export (federation.export_every)"
            )
        info = read_adapter_info(adapter)
        if info["base"].get("task") not in (None, module.task.name):
            raise ConfigError(
                f"--adapter was trained with task {info['base']['task']!r}, the config has {module.task.name!r}"
            )
        num_classes = int(info.get("num_classes") or 0)
    try:
        model = module.task.build_model(num_classes)
        if adapter is not None:
            model = load_adapter(model, adapter)
    except (ValueError, FileNotFoundError, KeyError) as err:
        raise ConfigError(f"could not build the model to evaluate: {err}") from err
    module.model = model.eval()
    return module.run_evaluators(prefix="")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fedlight evaluate",
        description="Run the evaluation suites (model.evaluators) of a config on an exported adapter and its base.",
    )
    parser.add_argument("adapter", nargs="?", help="an export directory (adapters/round-NNNN); omit to score the base")
    parser.add_argument("--config", help="the fit config (default: config.yaml of the run the adapter comes from)")
    parser.add_argument("--out", help="write evaluate.json and samples.jsonl into this directory")
    args = parser.parse_args(argv)
    config = args.config
    if config is None:
        if args.adapter is None:
            parser.error("give --config (and an adapter directory, or none to score the base)")
        found = Path(args.adapter).resolve().parent.parent / "config.yaml"
        if not found.is_file():
            raise ConfigError(f"no --config given and {found} does not exist; pass --config x.yaml")
        config = str(found)
    metrics, samples = evaluate_adapter(config, args.adapter)
    width = max(len(k) for k in metrics)
    print(f"evaluated {args.adapter or 'the base model'} with {config}")
    for key, value in metrics.items():
        print(f"  {key:<{width}}  {value:.4f}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        record = {"adapter": args.adapter, "config": str(config), "metrics": metrics}
        (out / "evaluate.json").write_text(json.dumps(record, indent=1) + "\n")
        with (out / "samples.jsonl").open("w", encoding="utf-8") as f:
            for sample in samples:
                f.write(json.dumps(sample, ensure_ascii=False, default=str) + "\n")
        print(f"wrote {out / 'evaluate.json'}", file=sys.stdout)
    return 0
