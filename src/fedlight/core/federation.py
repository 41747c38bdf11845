"""From the ``federation:`` options to a RoundEngine: validation, pipelines, features, compatibility.

Every engine builds its round from here (the Lightning callback and the Flower apps), so an option
means the same thing everywhere and a bad one fails the same way, before round 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedlight.core import compat
from fedlight.core.client import ClientPipeline
from fedlight.core.engine import RoundEngine, Schedule
from fedlight.core.executors import check_execution
from fedlight.core.faults import ClientFaults
from fedlight.core.heterogeneity import check_sampling
from fedlight.core.server import DEFAULT_MAX_NORM_OVER_MEDIAN, ServerPipeline


@dataclass
class FederationOptions:
    """The ``federation:`` section as plain values (the typed arguments of ``FederatedRound``)."""

    rounds: int = 10
    clients_per_round: int = 10
    local_steps: int | None = 10
    local_epochs: float | None = None
    aggregator: Any = None
    uplink_codec: Any = None
    downlink_codec: Any = None
    privacy: Any = None
    seed: int | None = None
    eval_before_training: bool = True
    checkpoint_every: int = 1
    faults: ClientFaults | None = None
    max_update_norm: float | None = None
    max_norm_over_median: float | None = DEFAULT_MAX_NORM_OVER_MEDIAN
    attack: Any = None
    malicious_fraction: float = 0.0
    export_every: int = 0
    export_merged: bool = False
    client_method: Any = None
    client_sampling: str = "uniform"
    compute_tiers: Any = None
    personal_eval_every: int = 0
    secure_aggregation: Any = None
    features: list[Any] | None = None
    execution: str = "steps"
    group_size: int | str = "auto"

    def __post_init__(self) -> None:
        self.faults = self.faults or ClientFaults()
        for name in ("rounds", "clients_per_round"):
            if getattr(self, name) < 1:
                raise ValueError(f"federation.{name} must be >= 1, got {getattr(self, name)}")
        if (self.local_steps is None) == (self.local_epochs is None):
            raise ValueError("set exactly one of federation.local_steps and federation.local_epochs (the other: null)")
        if self.local_steps is not None and self.local_steps < 1:
            raise ValueError(f"federation.local_steps must be >= 1, got {self.local_steps}")
        if self.local_epochs is not None and self.local_epochs <= 0:
            raise ValueError(f"federation.local_epochs must be > 0, got {self.local_epochs}")
        for name in ("checkpoint_every", "export_every", "personal_eval_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"federation.{name} must be >= 0, got {getattr(self, name)}")
        if self.clients_per_round < self.faults.min_clients:
            raise ValueError(
                f"federation.faults.min_clients ({self.faults.min_clients}) exceeds "
                f"federation.clients_per_round ({self.clients_per_round}): no round could ever succeed"
            )
        if not 0.0 <= self.malicious_fraction < 1.0:
            raise ValueError(f"federation.malicious_fraction must be in [0, 1), got {self.malicious_fraction}")
        if (self.attack is None) != (self.malicious_fraction == 0.0):
            raise ValueError("federation.attack and federation.malicious_fraction > 0 go together: set both or neither")
        self.client_sampling = check_sampling(self.client_sampling)
        check_execution(self.execution, self.group_size)
        compat.check(self.composition())

    def composition(self) -> compat.Composition:
        return compat.Composition(
            self.aggregator, self.privacy, self.uplink_codec, self.client_method, self.secure_aggregation,
            self.max_update_norm, self.clients_per_round, self.client_sampling, tuple(self.features or ()),
        )  # fmt: skip

    def schedule(self) -> Schedule:
        assert self.faults is not None, "__post_init__ fills in the default ClientFaults"
        return Schedule(
            self.rounds, self.clients_per_round, self.local_steps, self.local_epochs, self.faults,
            self.client_sampling, self.seed, self.compute_tiers,
        )  # fmt: skip

    def round_features(self) -> list[Any]:
        """Built-in features this config switches on, in a fixed order, then the user's ``features`` list."""
        from fedlight.features.attacks import MaliciousClients
        from fedlight.features.base_merging import MergeIntoBase
        from fedlight.features.client_method import ClientMethodFeature
        from fedlight.features.personal_eval import PersonalEvaluation
        from fedlight.features.privacy_budget import PrivacyBudget

        features: list[Any] = [PrivacyBudget()]
        if self.attack is not None:
            features.append(MaliciousClients(self.attack, self.malicious_fraction))
        if self.aggregator.merges_into_base:
            features.append(MergeIntoBase())
        if self.client_method is not None:
            features.append(ClientMethodFeature(self.client_method))
        if self.personal_eval_every:
            features.append(PersonalEvaluation(self.personal_eval_every))
        features.extend(self.features or [])
        keys = [f.key for f in features]
        if len(set(keys)) != len(keys):
            raise ValueError(f"federation.features: two features share a checkpoint key ({keys})")
        return features

    def pipelines(self) -> tuple[ClientPipeline, ServerPipeline]:
        """The client and server pipelines, or their secure-aggregation variants."""
        if self.secure_aggregation is not None:
            from fedlight.privacy.secure_pipelines import secure_pipelines

            return secure_pipelines(self)
        client = ClientPipeline(self.uplink_codec, self.downlink_codec, self.privacy)
        server = ServerPipeline(
            self.uplink_codec, self.downlink_codec, self.aggregator, self.privacy, self.max_update_norm,
            self.max_norm_over_median,
        )  # fmt: skip
        return client, server

    def build_engine(self) -> RoundEngine:
        client, server = self.pipelines()
        return RoundEngine(self.schedule(), client, server, self.privacy, self.round_features())
