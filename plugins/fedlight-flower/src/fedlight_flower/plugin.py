"""Entry-point module of fedlight-flower (group ``fedlight``).

It implements none of fedlight's plugin hooks: the Flower bridge is an *engine* (``fedlight flower ...`` /
``fedlight-flower ...``), not a task, PEFT method, codec, aggregator or privacy plugin. The entry point
makes ``fedlight plugins`` list the package under "plugin packages", and lets a later engine hook kind
(``fedlight_engines``) register it without a new install.
"""
