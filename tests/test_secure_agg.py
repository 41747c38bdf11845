"""Secure aggregation protocol: exact sums under post-masking dropout; the server sees only masked vectors."""

from __future__ import annotations

import numpy as np
import pytest

from fedlight.privacy.secure_agg import Quantizer, secure_sum, shamir_combine, shamir_split

Q = Quantizer(clip=1.0, scale=2.0**16, max_clients=100)


def _inputs(n: int = 10, dim: int = 500, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i: rng.uniform(-1.5, 1.5, dim) for i in range(n)}  # some values exceed the clip range


@pytest.mark.parametrize("dropped", [set(), {3}, {0, 4, 9}], ids=["0%", "10%", "30%"])
def test_secure_sum_equals_plain_quantised_sum(dropped):
    inputs = _inputs()
    got, server = secure_sum(inputs, Q, threshold=6, drop_after_masking=dropped)
    plain = sum(Q.encode(inputs[i]).astype(np.int64) for i in inputs if i not in dropped)
    assert np.array_equal(got, Q.decode_sum(plain))
    assert server.survivors == sorted(set(inputs) - dropped)
    # and it is the real sum up to quantisation
    exact = sum(np.clip(inputs[i], -1, 1) for i in inputs if i not in dropped)
    assert np.abs(got - exact).max() <= len(inputs) * 0.5 / Q.scale + 1e-12


def test_server_never_receives_an_unmasked_vector():
    inputs = _inputs()
    _, server = secure_sum(inputs, Q, threshold=6, drop_after_masking={2})
    encoded = {i: Q.encode(x) for i, x in inputs.items()}
    masked = [(cid, y) for kind, cid, y in server.received_log if kind == "masked"]
    assert len(masked) == 9
    for cid, y in masked:
        x = encoded[cid]
        assert np.mean(y == x) < 0.01  # essentially no coordinate leaks
        # masked values look uniform on the ring, unrelated to the input
        assert abs(np.corrcoef(y.astype(np.float64), x.view(np.int32).astype(np.float64))[0, 1]) < 0.2
        assert abs(y.astype(np.float64).mean() / 2**32 - 0.5) < 0.05
    for kind, _, payload in server.received_log:  # nothing else it got is an input vector either
        if isinstance(payload, np.ndarray) and kind != "masked":
            raise AssertionError(f"unexpected array in {kind}")


def test_too_many_dropouts_refuse_to_unmask():
    with pytest.raises(ValueError, match="threshold"):
        secure_sum(_inputs(n=5, dim=10), Q, threshold=4, drop_after_masking={0, 1})


def test_shamir_round_trip_any_t_shares():
    secret = bytes(range(32))
    shares = shamir_split(secret, 5, 3, [1, 2, 3, 4, 5])
    assert shamir_combine({k: shares[k] for k in (2, 4, 5)}, 3) == secret
    assert shamir_combine({k: shares[k] for k in (1, 3)} | {2: shares[2]}, 3) == secret
    with pytest.raises(ValueError):
        shamir_combine({1: shares[1], 2: shares[2]}, 3)


def test_quantizer_overflow_is_rejected():
    with pytest.raises(ValueError, match="overflow"):
        Quantizer(clip=1.0, scale=2.0**24, max_clients=1000)
