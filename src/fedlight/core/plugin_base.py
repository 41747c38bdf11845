"""The base every plugin class shares, whatever its kind."""

from __future__ import annotations

from typing import Any, ClassVar


class Plugin:
    """Common surface of all plugins.

    ``name`` is the short name users write in YAML (``class_path: lora``) and what
    ``fedlight plugins`` lists; the first docstring line is the description it prints.
    ``example_args`` are small ``__init__`` arguments the generated contract tests use, so no
    per-plugin special case ever lives in the test suite.
    """

    name: ClassVar[str] = ""
    example_args: ClassVar[dict[str, Any]] = {}

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint (tensors and plain Python values only); stateless by default."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise ValueError(f"{type(self).__name__} is stateless but got state keys {sorted(state)}")

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else "(no description)"
