"""Entry-point module of fedlight-flower (group ``fedlight``).

It deliberately implements none of fedlight's hooks: the Flower bridge is an *engine*, not a task,
PEFT method, codec, aggregator or privacy plugin. The entry point exists so the package is discovered
with the other plugin packages; listing engines in ``fedlight plugins`` needs a new hook kind
(``fedlight_engines``), proposed in docs/flower.md.
"""
