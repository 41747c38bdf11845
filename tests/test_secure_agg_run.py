"""Secure aggregation wired into runs: exact sums under dropout, server sees only masked vectors, composition matrix."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import read_rounds, round_callback, run_fit, text_config
from fedlight.aggregators.fedavg import FedAvg
from fedlight.codecs.identity import IdentityCodec
from fedlight.core.server import ServerPipeline
from fedlight.core.state import global_norm
from fedlight.privacy.dp_fedavg import DPFedAvg
from fedlight.privacy.none import NoPrivacy
from fedlight.privacy.secure_round import SecureAggregation, SecureRound

TEMPLATE = {"w": torch.zeros(6, 5), "b": torch.zeros(7), "s": torch.zeros(())}
DIM = 38


def _deltas(n: int, seed: int = 0) -> dict[int, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {i: {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in TEMPLATE.items()} for i in range(n)}


def _pipeline(privacy=None) -> ServerPipeline:
    return ServerPipeline(IdentityCodec(), IdentityCodec(), FedAvg(weighting="uniform"), privacy or NoPrivacy())


@pytest.mark.parametrize("lost", [set(), {4}, {0, 3, 7}], ids=["0%", "10%", "30%"])
def test_secure_round_gives_the_plain_mean_under_post_masking_dropout(lost):
    deltas = _deltas(10)
    rnd = SecureRound(SecureAggregation(threshold=0.6), TEMPLATE, list(range(10)), b"t", None, 10)
    updates = [rnd.client_update(i, d, 5, {}) for i, d in deltas.items()]
    arrived = [u for u in updates if u.client_id not in lost]  # masked, but never reached the server
    new, report = rnd.aggregate(_pipeline(), TEMPLATE, arrived, torch.Generator())
    survivors = sorted(set(range(10)) - lost)
    assert report.accepted == survivors and not report.rejected
    q = rnd.quantizer
    for k in TEMPLATE:  # exactly the survivors' quantised mean
        exact = sum(torch.from_numpy(q.decode_sum(q.encode(np.atleast_1d(deltas[i][k].double().numpy())))) for i in survivors) / len(survivors)
        torch.testing.assert_close(new[k], exact.float().reshape(TEMPLATE[k].shape), rtol=0, atol=1e-7)
    # what the server was handed: masked vectors only, none of them close to a client's input
    masked = [(c, y) for kind, c, y in rnd.server.received_log if kind == "masked"]
    assert [c for c, _ in masked] == survivors
    for c, y in masked:
        x = q.encode(np.concatenate([deltas[c][k].reshape(-1).double().numpy() for k in TEMPLATE]))
        assert np.mean(y == x) < 0.1
    for u in arrived:
        assert u.num_bytes == 4 * DIM
        assert not np.array_equal(np.frombuffer(u.payload, "<u4"), q.encode(
            np.concatenate([deltas[u.client_id][k].reshape(-1).double().numpy() for k in TEMPLATE])))  # fmt: skip
    # bytes: masked payloads + keys + share bundles + revealed shares, nothing hidden
    k, s = 10, len(survivors)
    assert report.uplink_bytes == 4 * DIM * s + 64 * k + 160 * k * (k - 1) + 70 * s * k
    assert rnd.downlink_overhead == 64 * k * (k - 1) + 160 * k * (k - 1)


def test_too_few_survivors_reveal_nothing():
    rnd = SecureRound(SecureAggregation(threshold=0.5), TEMPLATE, [0, 1, 2, 3], b"t", None, 4)
    updates = [rnd.client_update(i, d, 5, {}) for i, d in _deltas(4).items()]
    new, report = rnd.aggregate(_pipeline(), TEMPLATE, updates[:1], torch.Generator())
    assert new is TEMPLATE and report.accepted == [] and "threshold" in report.rejected[0]


def test_clipping_and_finiteness_move_to_the_client():
    dp = DPFedAvg(noise_multiplier=1.0, clip_norm=0.5, population=4, clients_per_round=2)
    rnd = SecureRound(SecureAggregation(), TEMPLATE, [0, 1, 2], b"t", dp.secure_clip_norm(), 3)
    big = {k: torch.full(v.shape, 40.0) for k, v in TEMPLATE.items()}
    zero = {k: torch.zeros(v.shape) for k, v in TEMPLATE.items()}
    bad = {**zero, "b": torch.full((7,), float("nan"))}
    assert rnd.client_update(2, bad, 5, {}) is None  # a NaN update never leaves the client
    ups = [rnd.client_update(0, big, 5, {}), rnd.client_update(1, zero, 5, {})]
    new, _ = rnd.aggregate(_pipeline(), TEMPLATE, ups, torch.Generator())
    # mean of (clipped big, zero): twice it is client 0's quantised clipped delta
    assert global_norm({k: 2 * v.double() for k, v in new.items()}) <= 0.5
    assert global_norm({k: 2 * v.double() for k, v in new.items()}) == pytest.approx(0.5, rel=1e-6)


def test_dp_noise_is_added_once_to_the_unmasked_mean():
    dp = DPFedAvg(noise_multiplier=2.0, clip_norm=0.1, population=40, clients_per_round=4)
    tmpl = {"w": torch.zeros(50_000)}
    rnd = SecureRound(SecureAggregation(), tmpl, [0, 1, 2, 3], b"t", dp.secure_clip_norm(), 4)
    ups = [rnd.client_update(i, {"w": torch.zeros(50_000)}, 5, {}) for i in range(4)]
    new, _ = rnd.aggregate(_pipeline(dp), tmpl, ups, torch.Generator().manual_seed(0))
    assert new["w"].std().item() == pytest.approx(2.0 * 0.1 / 4, rel=0.02)  # sigma*C on the sum of 4


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"aggregator": {"class_path": "median"}}, "robust aggregation"),
        ({"aggregator": {"class_path": "trimmed_mean", "init_args": {"beta": 0.1}}}, "robust aggregation"),
        ({"aggregator": {"class_path": "krum", "init_args": {"num_byzantine": 1}}}, "robust aggregation"),
        ({"aggregator": {"class_path": "norm_bounding", "init_args": {"max_norm": 1.0}}}, "robust aggregation"),
        ({"aggregator": {"class_path": "geometric_median"}}, "robust aggregation"),
        ({"aggregator": {"class_path": "fedavg", "init_args": {"weighting": "examples"}}}, "weighting: uniform"),
        ({"max_update_norm": 1.0}, "max_update_norm"),
        ({"uplink_codec": {"class_path": "int8"}}, "uplink_codec: identity"),
        ({"privacy": {"class_path": "dp_fedavg", "init_args": {"adaptive_clipping": True, "clipped_count_stddev": 1.0}}}, "adaptive_clipping"),
        ({"clients_per_round": 1}, "clients_per_round >= 2"),
    ],
)
def test_unsound_combinations_are_refused_before_training(tiny_bert_dir, tmp_path, overrides, match):
    fed = {"secure_aggregation": {"threshold": 0.5}, "aggregator": {"class_path": "fedavg", "init_args": {"weighting": "uniform"}}}
    cfg = text_config(tiny_bert_dir, tmp_path, federation={**fed, **overrides})
    with pytest.raises(ValueError, match=match):
        run_fit(cfg, tmp_path)
    assert not list(tmp_path.rglob("rounds.csv"))


def test_secure_run_equals_plain_run_and_survives_dropout(tiny_bert_dir, tmp_path, monkeypatch):
    uniform = {"class_path": "fedavg", "init_args": {"weighting": "uniform"}}
    fed = {"rounds": 2, "clients_per_round": 4, "aggregator": uniform}
    plain = round_callback(run_fit(text_config(tiny_bert_dir, tmp_path / "plain", federation=fed), tmp_path / "plain"))

    def never(*args, **kwargs):
        raise AssertionError("the plain server path (individual updates) ran under secure aggregation")

    monkeypatch.setattr(ServerPipeline, "aggregate", never)
    secure_fed = {**fed, "secure_aggregation": {"threshold": 0.5}}
    secure = round_callback(run_fit(text_config(tiny_bert_dir, tmp_path / "sec", federation=secure_fed), tmp_path / "sec"))
    for k, v in plain.global_state.items():
        torch.testing.assert_close(secure.global_state[k], v, rtol=0, atol=1e-6)
    rows = read_rounds(tmp_path / "sec")
    dim = sum(v.numel() for v in plain.global_state.values())
    assert int(rows[1]["uplink_bytes"]) > 4 * dim * 4  # masked payloads plus key/share messages
    # DP-FedAvg + SecAgg with 30% post-masking dropout: runs, noise on the sum, ε logged
    dropout_fed = {
        **secure_fed,
        "privacy": {"class_path": "dp_fedavg", "init_args": {"noise_multiplier": 1.0, "clip_norm": 0.5}},
        "faults": {"dropout_after": 0.3},
    }
    local_head = {"peft": {"class_path": "lora", "init_args": {"r": 2, "alpha": 4, "head": "local"}}}  # client-kept tensors too
    cfg = text_config(tiny_bert_dir, tmp_path / "dp", federation=dropout_fed, model=local_head)
    run = round_callback(run_fit(cfg, tmp_path / "dp"))
    rows = read_rounds(tmp_path / "dp")[1:]
    assert all(float(r["epsilon"]) > 0 for r in rows)
    assert sum(int(r["num_clients"]) for r in rows) < 8 and all(math.isfinite(v.sum()) for v in run.global_state.values())
