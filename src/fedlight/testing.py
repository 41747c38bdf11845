"""Contract checks a plugin package runs on its own plugins: the same guarantees fedlight's built-ins have.

Each ``check_*`` takes a plugin class, builds it from its ``example_args`` and raises ``AssertionError``
naming what is wrong. In a plugin package's tests::

    import pytest
    from fedlight import testing
    from my_package.plugin import MyAggregator

    @pytest.mark.parametrize("check", testing.AGGREGATOR_CHECKS)
    def test_contract(check):
        check(MyAggregator)

or run every check on every registered plugin of the package with :func:`check_registered`.
fedlight's own test suite runs the same functions over its registry.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import torch

from fedlight.aggregators.base import Aggregator
from fedlight.codecs.base import Codec
from fedlight.codecs.wire import PayloadError
from fedlight.core.plugin_base import Plugin
from fedlight.core.state import State
from fedlight.core.update import DecodedUpdate
from fedlight.features.base import RoundFeature

GLOBAL: State = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor(0.5)}


def _updates(vectors: list[list[float]], sizes: list[int] | None = None) -> list[DecodedUpdate]:
    sizes = sizes or [10] * len(vectors)
    return [
        DecodedUpdate(i, n, {"w": torch.tensor(v[:-1], dtype=torch.float32), "b": torch.tensor(v[-1])})
        for i, (v, n) in enumerate(zip(vectors, sizes, strict=True))
    ]


def plain(value: Any) -> bool:
    """Only tensors and plain Python values: what a checkpoint may hold (loadable with ``weights_only=True``)."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return all(plain(v) for v in value)
    return value is None or isinstance(value, torch.Tensor | bool | int | float | str)


def build(cls: type) -> Any:
    return cls(**getattr(cls, "example_args", {}))


# --- every plugin -------------------------------------------------------------------------------


def check_well_formed(cls: type) -> None:
    """A short name, a one-line summary for ``fedlight plugins``, and it builds from its example args."""
    assert issubclass(cls, Plugin), f"{cls.__name__} must subclass a fedlight plugin base class"
    assert cls.name and cls.name.isidentifier(), f"{cls.__name__}.name must be a short identifier, got {cls.name!r}"
    assert cls.summary() != "(no description)", f"{cls.__name__} needs a docstring (its first line is listed)"
    build(cls)


def check_state_round_trip(cls: type) -> None:
    """``state_dict`` holds only plain values and survives ``torch.save`` / ``weights_only=True`` loading."""
    obj = build(cls)
    state = obj.state_dict()
    assert plain(state), f"{cls.__name__}.state_dict() must hold only tensors and plain values: {state!r}"
    buffer = io.BytesIO()
    torch.save(state, buffer)
    build(cls).load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))


# --- aggregators --------------------------------------------------------------------------------


def check_aggregator_order_invariant(cls: type[Aggregator]) -> None:
    """The clients' order does not change the aggregate."""
    g = torch.Generator().manual_seed(0)
    vectors = torch.randn(7, 3, generator=g).tolist()
    sizes = [3, 9, 4, 12, 7, 5, 8]
    a = build(cls).aggregate(GLOBAL, _updates(vectors, sizes))
    perm = [3, 0, 6, 2, 5, 1, 4]
    b = build(cls).aggregate(GLOBAL, _updates([vectors[i] for i in perm], [sizes[i] for i in perm]))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), f"{cls.name}: client order changes {k}"


def check_aggregator_resumes_exactly(cls: type[Aggregator]) -> None:
    """A server state saved after round 1 and loaded into a fresh instance continues bit-identically."""
    g = torch.Generator().manual_seed(1)
    rounds = [_updates(torch.randn(5, 3, generator=g).tolist(), [4, 8, 2, 6, 5]) for _ in range(3)]
    agg = build(cls)
    state = agg.aggregate(GLOBAL, rounds[0])
    saved = agg.state_dict()
    assert plain(saved), f"{cls.name}: state_dict must hold only tensors and plain values"
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    continuing = [agg.aggregate(state, rounds[1])]
    continuing.append(agg.aggregate(continuing[0], rounds[2]))
    fresh = build(cls)
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    resumed = [fresh.aggregate(state, rounds[1])]
    resumed.append(fresh.aggregate(resumed[0], rounds[2]))
    for a, b in zip(continuing, resumed, strict=True):
        for k in a:
            assert torch.equal(a[k], b[k]), f"{cls.name}: resumed state differs in {k}"


def check_aggregator_refuses_empty_round(cls: type[Aggregator]) -> None:
    try:
        build(cls).aggregate(GLOBAL, [])
    except ValueError:
        return
    raise AssertionError(f"{cls.name}: aggregating no updates must raise ValueError")


# --- codecs -------------------------------------------------------------------------------------


def _state() -> State:
    g = torch.Generator().manual_seed(0)
    return {"layer.lora_A": torch.randn(8, 24, generator=g), "bias": torch.randn(5, generator=g) * 1e-3}


def check_codec_round_trip(cls: type[Codec]) -> None:
    """decode(encode(x)) is within the documented ``max_rel_error`` (exact when it is 0), fp32, same names."""
    codec, x = build(cls), _state()
    y = codec.decode(codec.encode(x), reference=x)
    assert list(y) == list(x), f"{cls.name}: names/order changed"
    for name, ref in x.items():
        out = y[name]
        assert out.dtype == torch.float32 and out.shape == ref.shape, f"{cls.name}: {name} dtype/shape"
        bound = (codec.max_rel_error + 1e-6) * float(ref.abs().max())
        assert float((out - ref).abs().max()) <= bound, f"{cls.name}: {name} beyond max_rel_error"


def check_codec_rejects_corruption(cls: type[Codec]) -> None:
    """Truncated payloads and flipped bytes are PayloadErrors, never other exceptions or silent data."""
    codec, x = build(cls), _state()
    payload = codec.encode(x)
    for bad in (payload[:-1], payload[: len(payload) // 2], payload + b"\0", bytes([payload[0] ^ 1]) + payload[1:]):
        try:
            codec.decode(bad, reference=x)
        except PayloadError:
            continue
        raise AssertionError(f"{cls.name}: a corrupted payload decoded")


# --- round features -----------------------------------------------------------------------------


def check_round_feature_key(cls: type[RoundFeature]) -> None:
    """A checkpoint key of its own (the engine stores the feature's state under it)."""
    assert cls.key, f"{cls.__name__} needs a checkpoint key (defaults to its name)"


COMMON_CHECKS: list[Callable[[type], None]] = [check_well_formed, check_state_round_trip]
AGGREGATOR_CHECKS = [
    *COMMON_CHECKS, check_aggregator_order_invariant, check_aggregator_resumes_exactly,
    check_aggregator_refuses_empty_round,
]  # fmt: skip
CODEC_CHECKS = [*COMMON_CHECKS, check_codec_round_trip, check_codec_rejects_corruption]
ROUND_FEATURE_CHECKS = [*COMMON_CHECKS, check_round_feature_key]
#: the checks of each plugin kind (kinds without specific checks get the common ones)
CHECKS: dict[str, list[Callable[[type], None]]] = {
    "aggregators": AGGREGATOR_CHECKS,
    "codecs": CODEC_CHECKS,
    "round_features": ROUND_FEATURE_CHECKS,
}


def checks_for(kind: str) -> list[Callable[[type], None]]:
    return CHECKS.get(kind, COMMON_CHECKS)


def check_registered(provider: str) -> int:
    """Run every check on every plugin ``provider`` (a distribution name) registers; returns how many ran."""
    from fedlight.plugins import build_registry

    registry = build_registry(autoload=True)
    ran = 0
    for kind, table in registry.entries.items():
        for entry in table.values():
            if entry.provider == provider:
                for check in checks_for(kind):
                    check(entry.cls)
                    ran += 1
    assert ran, f"no plugins registered by {provider!r}: is it installed, with its entry point?"
    return ran
