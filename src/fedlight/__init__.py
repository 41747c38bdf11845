"""fedlight: federated fine-tuning of foundation models with parameter-efficient methods."""

from fedlight.core.module import FederatedModule
from fedlight.core.datamodule import FederatedDataModule
from fedlight.core.round import FederatedRound
from fedlight.hookspecs import hookimpl
from fedlight.plugins import get_registry

__version__ = "0.1.0"
__all__ = ["FederatedDataModule", "FederatedModule", "FederatedRound", "get_registry", "hookimpl", "__version__"]
