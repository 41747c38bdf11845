"""Entry-point module of fedlight-flower (group ``fedlight``): the ``flower`` engine subcommand.

The Flower bridge is an *engine*, not a task, PEFT method, codec, aggregator or privacy plugin: it
implements ``fedlight_engines``, so ``fedlight flower ...`` runs :func:`fedlight_flower.cli.main`
(core never imports fedlight_flower). ``fedlight plugins`` lists the package under "plugin packages".
"""

from __future__ import annotations

from fedlight.hookspecs import hookimpl


@hookimpl
def fedlight_engines() -> dict[str, object]:
    from fedlight_flower.cli import main  # lazily: the CLI module imports nothing heavy, but Flower does later

    return {"flower": main}
