"""Round checkpoints: atomic writes, pickle-free loads, RNG states Lightning does not save.

A round checkpoint is an ordinary Lightning checkpoint (so ``fedlight fit --ckpt_path`` resumes it)
whose module state holds only trainable tensors and buffers (the frozen backbone is rebuilt from its
source), and whose ``FederatedRound`` state holds the global state, client-state store, plugin
states, run history and the RNG states at the end of the round.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from fedlight.core.storage import atomic_copy, atomic_write
from fedlight.errors import CheckpointError

__all__ = ["AtomicCheckpointIO", "CheckpointError", "atomic_copy", "capture_rng", "restore_rng"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to ``<name>.tmp``, fsync and ``os.replace`` it, so neither a kill nor a full or read-only
    disk leaves a torn checkpoint (the latter ends the run with a ``StorageError`` naming the path);
    load with ``weights_only=True`` so a checkpoint can never run code."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        atomic_write(path, lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        try:
            return torch.load(path, map_location=map_location or "cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - torch raises several types for torn or hostile files
            raise CheckpointError(
                f"checkpoint {path} could not be loaded safely ({type(err).__name__}: {str(err).splitlines()[0]}); "
                "it is corrupt, truncated or contains objects that need pickle, which fedlight refuses"
            ) from None


def capture_rng() -> dict[str, Any]:
    """RNG states as tensors and plain values (loadable with ``weights_only=True``)."""
    legacy = np.random.get_state(legacy=True)
    assert isinstance(legacy, tuple), "numpy's global RandomState is an MT19937: its legacy state is a tuple"
    kind, keys, pos, has_gauss, cached = legacy
    return {
        "torch": torch.get_rng_state(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
