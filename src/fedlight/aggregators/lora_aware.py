"""LoRA-aware aggregation: FedEx-LoRA, FLoRA (exact), HetLoRA and FlexLoRA (heterogeneous ranks).

Averaging LoRA factors is not averaging updates: mean(B)·mean(A) ≠ mean(B·A). These aggregators see
the model's LoRA layout (pairs of ``lora_A``/``lora_B`` tensors and the frozen weight they modify,
bound by the round loop before round 1) and treat each pair as a matrix product. Every other shipped
tensor (e.g. a classifier head) is averaged as in FedAvg.

A client's factors are reconstructed on the server as ``client_view(global) + delta``: the global
state, or for the heterogeneous-rank methods the global state truncated to the client's rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fedlight.aggregators.base import Aggregator, check_weighting, client_weights
from fedlight.core.seeds import Purpose, aggregator_generator, run_rng
from fedlight.core.state import State
from fedlight.core.update import DecodedUpdate
from fedlight.hookspecs import hookimpl


class LoraAggregator(Aggregator):
    """Shared plumbing: the bound layout, client factor reconstruction, FedAvg for non-LoRA tensors."""

    needs_lora = True

    def __init__(self, weighting: str = "examples") -> None:
        self.weighting = check_weighting(weighting, self.name)
        self.pairs: list = []

    def bind_lora(self, pairs: list) -> None:
        if not pairs:
            raise ValueError(
                f"aggregator {self.name!r} needs a LoRA model, but the model has no LoRA layers (use peft: lora)"
            )
        self.pairs = list(pairs)

    def active_pairs(self, state: State) -> list:
        """The bound pairs whose two factors travel (a pair with a frozen or local factor is not one)."""
        return [p for p in self.pairs if p.a in state and p.b in state]

    def weights(self, global_state: State, updates: Sequence[DecodedUpdate]) -> list[float]:
        return client_weights(updates, self.weighting, self.name)

    def client_state(self, global_state: State, update: DecodedUpdate, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The client's trained tensors (fp64): what it started from plus its delta."""
        start = self.client_view(global_state, update.client_id)
        return {n: start[n].double() + update.delta[n].double() for n in names}

    def fedavg(
        self, global_state: State, updates: Sequence[DecodedUpdate], weights: list[float], skip: set[str]
    ) -> State:
        """FedAvg of the tensors not in ``skip``: global + Σ w_k delta_k (fp64 accumulation)."""
        out: State = {}
        for name, value in global_state.items():
            if name in skip:
                continue
            acc = sum(w * u.delta[name].double() for u, w in zip(updates, weights))
            out[name] = (value.double() + acc).to(value.dtype)
        return out

    def aggregate(self, global_state: State, updates: list[DecodedUpdate]) -> State:
        """The new trainable state only (the server pipeline calls :meth:`aggregate_with_base`)."""
        return self.aggregate_with_base(global_state, updates)[0]

    def aggregate_with_base(self, global_state: State, updates: list[DecodedUpdate]) -> tuple[State, State]:
        if not self.pairs and any(".lora_A." in n or ".lora_B." in n for n in global_state):
            raise ValueError(
                f"aggregator {self.name!r} got LoRA tensors but no LoRA layout: the engine must call bind_lora() "
                "before the first round (the in-process round loop does)"
            )
        weights = self.weights(global_state, updates)
        pairs = self.active_pairs(global_state)
        new = self.fedavg(global_state, updates, weights, {n for p in pairs for n in (p.a, p.b)})
        base: State = {}
        for pair in pairs:
            clients = [self.client_state(global_state, u, (pair.a, pair.b)) for u in updates]
            a, b, delta = self.combine(pair, global_state, updates, clients, weights)
            new[pair.a], new[pair.b] = a.to(global_state[pair.a].dtype), b.to(global_state[pair.b].dtype)
            if delta is not None:
                base[pair.base] = delta.float()
        return {k: new[k] for k in global_state}, base

    def combine(self, pair, global_state, updates, clients, weights):
        """``(new A, new B, base delta or None)`` for one LoRA pair."""
        raise NotImplementedError


def _exact_product(pair, clients, weights) -> torch.Tensor:
    """Σ_k w_k B_k A_k in fp64."""
    return sum(w * (c[pair.b] @ c[pair.a]) for c, w in zip(clients, weights))


class FedExLoRA(LoraAggregator):
    """FedEx-LoRA (Singhal et al. 2024, arXiv:2410.09432): average A and B, fold the exact residual into the frozen weight.

    New factors Ā = Σ p_k A_k, B̄ = Σ p_k B_k; the residual s·(Σ p_k B_k A_k − B̄Ā) is added to the
    frozen base weight, so the global effective weight W0' + s·B̄Ā equals Σ p_k (W0 + s·B_k A_k)
    exactly (to float rounding). The residual is a dense matrix per adapted layer, broadcast to clients.
    """

    name = "fedex_lora"
    merges_into_base = True

    def combine(self, pair, global_state, updates, clients, weights):
        a = sum(w * c[pair.a] for c, w in zip(clients, weights))
        b = sum(w * c[pair.b] for c, w in zip(clients, weights))
        a32, b32 = a.to(global_state[pair.a].dtype), b.to(global_state[pair.b].dtype)  # what the model will hold
        residual = pair.to_base(_exact_product(pair, clients, weights) - b32.double() @ a32.double())
        return a32, b32, residual


class FLoRA(LoraAggregator):
    """FLoRA (Wang et al. 2024, arXiv:2409.05976): stack the clients' factors, merge Σ p_k·s·B_k A_k into the base, re-initialise LoRA.

    Stacking [p_1 B_1 … p_K B_K]·[A_1; …; A_K] = Σ p_k B_k A_k, so the aggregate is exact; it is folded
    into the frozen weight and the LoRA factors restart (A ~ peft's kaiming-uniform init, seeded by
    ``seed`` and the round; B = 0), so next round's clients start from the merged model.
    """

    name = "flora"
    merges_into_base = True
    example_args = {"seed": 0}

    def __init__(self, weighting: str = "examples", seed: int = 0) -> None:
        super().__init__(weighting)
        self.seed = seed
        self.step = 0

    def aggregate_with_base(self, global_state, updates):
        result = super().aggregate_with_base(global_state, updates)
        self.step += 1
        return result

    def combine(self, pair, global_state, updates, clients, weights):
        index = self.pairs.index(pair)
        generator = aggregator_generator(self.seed, self.step, index)
        shape = global_state[pair.a].shape
        bound = 1.0 / math.sqrt(shape[1])  # kaiming_uniform_(a=sqrt(5)) on (r, in), as peft initialises A
        a = (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound
        b = torch.zeros(global_state[pair.b].shape, dtype=torch.float64)
        return a, b, pair.to_base(_exact_product(pair, clients, weights))

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = int(state["step"])


# --- heterogeneous ranks ------------------------------------------------------------------------------


class RankTiered(LoraAggregator):
    """Per-client LoRA ranks r_k ≤ r (the model's LoRA rank), from seeded tiers; a client trains its first r_k components."""

    def __init__(
        self,
        rank_tiers: list[int] = [2, 4, 8],  # noqa: B006 (never mutated; jsonargparse shows the default)
        rank_probs: list[float] | None = None,
        rank_seed: int = 0,
        weighting: str = "examples",
    ) -> None:
        super().__init__(weighting)
        if not rank_tiers or any(int(r) < 1 for r in rank_tiers):
            raise ValueError(f"{self.name} rank_tiers must be a non-empty list of ranks >= 1, got {rank_tiers}")
        if rank_probs is not None and (
            len(rank_probs) != len(rank_tiers) or any(p < 0 for p in rank_probs) or abs(sum(rank_probs) - 1) > 1e-6
        ):
            raise ValueError(f"{self.name} rank_probs must have one entry >= 0 per tier and sum to 1, got {rank_probs}")
        self.rank_tiers = [int(r) for r in rank_tiers]
        self.rank_probs = rank_probs
        self.rank_seed = rank_seed

    def bind_lora(self, pairs):
        super().bind_lora(pairs)
        self.check_ranks(min(p.r for p in self.pairs))

    def check_ranks(self, r: int) -> None:
        if max(self.rank_tiers) > r:
            raise ValueError(
                f"{self.name} rank_tiers {self.rank_tiers} exceed the model's LoRA rank r={r}: raise peft r"
            )

    def tier_rank(self, client_id: int) -> int:
        """Client ``client_id``'s rank tier: a function of (rank_seed, client id) only."""
        rng = run_rng(self.rank_seed, Purpose.RANKS, int(client_id))
        return self.rank_tiers[int(rng.choice(len(self.rank_tiers), p=self.rank_probs))]

    def rank_of(self, client_id: int) -> int:
        return self.tier_rank(client_id)

    def client_state(self, global_state, update, names):
        """The client's factors, truncated to its rank: whatever arrives beyond r_k (e.g. local-DP noise) is ignored."""
        # = client_view(global) + delta, truncated; without cloning every tensor of the view per call
        out = {n: global_state[n].double() + update.delta[n].double() for n in names}
        r = self.rank_of(update.client_id)
        for pair in self.pairs:
            if pair.a in out:
                out[pair.a][r:] = 0
            if pair.b in out:
                out[pair.b][:, r:] = 0
        return out

    def client_view(self, global_state: State, client_id: int) -> State:
        pairs = self.active_pairs(global_state)
        if not pairs:
            return global_state
        r = self.rank_of(client_id)
        out = dict(global_state)
        for pair in pairs:
            self.check_ranks(global_state[pair.a].shape[0])
            a, b = global_state[pair.a].clone(), global_state[pair.b].clone()
            a[r:] = 0
            b[:, r:] = 0
            out[pair.a], out[pair.b] = a, b
        return out


class HetLoRA(RankTiered):
    """HetLoRA (Cho et al. 2024, arXiv:2401.06432): heterogeneous client ranks by zero-padding, with optional rank self-pruning.

    Client k trains only the first r_k rank components (its A rows and B columns beyond r_k are zero
    and stay zero). The server averages the zero-padded factors component by component over the
    clients that hold that component (weights renormalised; a component no sampled client holds keeps
    its global value). ``weighting: sparsity`` weights clients by the Frobenius norm of their update
    B_k A_k − BA over all adapted layers (the paper's sparsity-weighted aggregation). With ``prune_fraction`` γ > 0 a
    client whose last ⌈γ r_k⌉ components carry less than ``prune_threshold`` of its ‖B_k A_k‖ drops them
    for the rest of the run (rank self-pruning, never below 1).
    """

    name = "hetlora"
    example_args = {"rank_tiers": [1, 2]}

    def __init__(
        self,
        rank_tiers: list[int] = [2, 4, 8],  # noqa: B006
        rank_probs: list[float] | None = None,
        rank_seed: int = 0,
        weighting: str = "examples",
        prune_fraction: float = 0.0,
        prune_threshold: float = 0.1,
    ) -> None:
        if weighting not in ("examples", "uniform", "sparsity"):
            raise ValueError(f"hetlora weighting must be 'examples', 'uniform' or 'sparsity', got {weighting!r}")
        super().__init__(rank_tiers, rank_probs, rank_seed, "uniform" if weighting == "sparsity" else weighting)
        self.weighting = weighting
        if not 0.0 <= prune_fraction < 1.0:
            raise ValueError(f"hetlora prune_fraction must be in [0, 1), got {prune_fraction}")
        if not 0.0 <= prune_threshold <= 1.0:
            raise ValueError(f"hetlora prune_threshold must be in [0, 1], got {prune_threshold}")
        self.prune_fraction, self.prune_threshold = prune_fraction, prune_threshold
        self.pruned: dict[int, int] = {}

    def rank_of(self, client_id: int) -> int:
        return self.pruned.get(int(client_id), self.tier_rank(client_id))

    def weights(self, global_state, updates):
        if self.weighting != "sparsity":
            return super().weights(global_state, updates)
        pairs = self.active_pairs(global_state)
        norms = []
        for u in updates:
            c = self.client_state(global_state, u, [n for p in pairs for n in (p.a, p.b)])
            start = self.client_view(global_state, u.client_id)
            sq = sum(float((c[p.b] @ c[p.a] - start[p.b].double() @ start[p.a].double()).pow(2).sum()) for p in pairs)
            norms.append(math.sqrt(sq))
        total = sum(norms)
        if not pairs or total == 0:
            return client_weights(updates, "uniform", self.name)
        return [n / total for n in norms]

    def aggregate_with_base(self, global_state, updates):
        ranks = [self.rank_of(u.client_id) for u in updates]  # before this round's pruning
        self._ranks = ranks
        result = super().aggregate_with_base(global_state, updates)
        if self.prune_fraction > 0:
            self._self_prune(global_state, updates, ranks)
        return result

    def combine(self, pair, global_state, updates, clients, weights):
        r = global_state[pair.a].shape[0]
        self.check_ranks(r)
        a = global_state[pair.a].double().clone()
        b = global_state[pair.b].double().clone()
        for j in range(r):
            holders = [(c, w) for c, w, rk in zip(clients, weights, self._ranks) if rk > j]
            total = sum(w for _, w in holders)
            if not holders or total <= 0:
                continue  # no sampled client trained component j: keep the global one
            a[j] = sum(w * c[pair.a][j] for c, w in holders) / total
            b[:, j] = sum(w * c[pair.b][:, j] for c, w in holders) / total
        return a, b, None

    def _self_prune(self, global_state, updates, ranks) -> None:
        pairs = self.active_pairs(global_state)
        for u, rk in zip(updates, ranks):
            cut = math.ceil(self.prune_fraction * rk)
            if rk - cut < 1 or cut == 0:
                continue
            c = self.client_state(global_state, u, [n for p in pairs for n in (p.a, p.b)])
            full = sum(float((c[p.b] @ c[p.a]).pow(2).sum()) for p in pairs)
            tail = sum(float((c[p.b][:, rk - cut : rk] @ c[p.a][rk - cut : rk]).pow(2).sum()) for p in pairs)
            if full > 0 and math.sqrt(tail / full) < self.prune_threshold:
                self.pruned[int(u.client_id)] = rk - cut

    def state_dict(self):
        return {"pruned": {str(k): v for k, v in sorted(self.pruned.items())}}

    def load_state_dict(self, state):
        self.pruned = {int(k): int(v) for k, v in state.get("pruned", {}).items()}


class FlexLoRA(RankTiered):
    """FlexLoRA (Bai et al. 2024, arXiv:2402.11505): aggregate the full ΔW = Σ p_k B_k A_k, SVD-truncate; client k takes the top r_k.

    The new global factors are B = U_r·√Σ_r and A = √Σ_r·V_rᵀ from the SVD of Σ p_k B_k A_k (fp64), with
    r the model's LoRA rank: the best rank-r approximation (Eckart–Young). Components are in
    descending singular-value order, so client k's first r_k components are the best rank-r_k one.
    """

    name = "flexlora"
    example_args = {"rank_tiers": [1, 2]}

    def combine(self, pair, global_state, updates, clients, weights):
        r = global_state[pair.a].shape[0]
        self.check_ranks(r)
        u, s, vh = torch.linalg.svd(_exact_product(pair, clients, weights), full_matrices=False)
        k = min(r, s.numel())
        root = s[:k].sqrt()
        a = torch.zeros(global_state[pair.a].shape, dtype=torch.float64)
        b = torch.zeros(global_state[pair.b].shape, dtype=torch.float64)
        a[:k] = root[:, None] * vh[:k]
        b[:, :k] = u[:, :k] * root[None, :]
        return a, b, None


@hookimpl
def fedlight_aggregators() -> list[type]:
    return [FedExLoRA, FLoRA, HetLoRA, FlexLoRA]
