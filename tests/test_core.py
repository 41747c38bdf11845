"""Core maths and invariants without a training loop: wire format, plan, batch order, FedAvg, server."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlight.aggregators.fedavg import FedAvg
from fedlight.codecs import wire
from fedlight.codecs.identity import IdentityCodec
from fedlight.core.client import ClientPipeline
from fedlight.core.datamodule import ClientTaggedDataset, RoundBatchSampler
from fedlight.core.plan import plan_round
from fedlight.core.server import ServerPipeline
from fedlight.core.update import ClientUpdate, DecodedUpdate
from fedlight.privacy.none import NoPrivacy


def _state(*values):
    return {"a": torch.tensor(values[0], dtype=torch.float32), "b": torch.tensor(values[1], dtype=torch.float32)}


def test_fedavg_equals_hand_computed_weighted_mean():
    glob = _state([1.0, 2.0], [[0.5]])
    updates = [
        DecodedUpdate(0, 10, _state([1.0, 0.0], [[3.0]])),
        DecodedUpdate(1, 30, _state([-1.0, 4.0], [[1.0]])),
    ]
    new = FedAvg().aggregate(glob, updates)
    # a: 1 + (10*1 + 30*-1)/40 = 0.5 ; 2 + (0 + 120)/40 = 5 ; b: 0.5 + (30 + 30)/40 = 2.0
    assert torch.equal(new["a"], torch.tensor([0.5, 5.0]))
    assert torch.equal(new["b"], torch.tensor([[2.0]]))
    uniform = FedAvg(weighting="uniform").aggregate(glob, updates)
    assert torch.equal(uniform["a"], torch.tensor([1.0, 4.0]))


def test_wire_round_trip_is_bit_exact_for_every_dtype():
    tensors = [
        wire.Buffer("f32", torch.randn(3, 4)),
        wire.Buffer("bf16", torch.randn(5).to(torch.bfloat16)),
        wire.Buffer("i8", torch.tensor([-128, 0, 127], dtype=torch.int8)),
        wire.Buffer("scalar", torch.tensor(3.5)),
        wire.Buffer("empty", torch.empty(0, 7)),
        wire.Buffer("noncontig", torch.randn(4, 3).t()),
    ]
    out, meta = wire.unpack(wire.pack(tensors, {"codec": "x", "k": 1}))
    assert meta == {"codec": "x", "k": 1}
    for a, b in zip(tensors, out):
        assert a.name == b.name and a.tensor.dtype == b.tensor.dtype and torch.equal(a.tensor, b.tensor)


@pytest.mark.parametrize("corrupt", ["truncate", "trailing", "magic", "header"])
def test_wire_rejects_corrupt_payloads(corrupt):
    payload = wire.pack([wire.Buffer("w", torch.randn(10))], {"codec": "identity"})
    bad = {
        "truncate": payload[:-3],
        "trailing": payload + b"\0",
        "magic": b"XXXX" + payload[4:],
        "header": payload[:8] + b"x" + payload[9:],
    }[corrupt]
    with pytest.raises(wire.PayloadError):
        wire.unpack(bad)


def test_round_plan_is_seeded_and_resumable():
    sizes = [10, 20, 30, 40, 50]
    a = plan_round(7, 3, sizes, 2, 8, local_steps=None, local_epochs=1.0)
    b = plan_round(7, 3, sizes, 2, 8, local_steps=None, local_epochs=1.0)
    assert a == b and len(set(a.clients)) == 2
    assert a.steps == tuple(int(np.ceil(sizes[c] / 8)) for c in a.clients)
    rounds = {plan_round(7, r, sizes, 2, 8, 3, None).clients for r in range(1, 30)}
    assert len(rounds) > 3  # different rounds sample different clients
    with pytest.raises(ValueError, match="clients_per_round"):
        plan_round(0, 1, sizes, 6, 8, 1, None)


def test_round_batches_are_client_contiguous_and_tagged():
    client_indices = [np.arange(0, 5), np.arange(5, 20), np.arange(20, 23)]
    plan = plan_round(0, 1, [5, 15, 3], 3, 4, local_steps=3, local_epochs=None)
    sampler = RoundBatchSampler(plan, client_indices, batch_size=4, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 9
    dataset = ClientTaggedDataset([{"x": i} for i in range(23)])
    for k, batch in enumerate(batches):
        client = plan.clients[k // 3]
        assert {c for c, _ in batch} == {client}
        assert all(i in client_indices[client] for _, i in batch)
        assert len({i for _, i in batch}) == len(batch) == min(4, len(client_indices[client]))
        assert dataset[batch[0]]["client_id"] == client
    assert batches == list(RoundBatchSampler(plan, client_indices, 4, 0))  # deterministic


def _pipelines():
    codec = IdentityCodec()
    return ClientPipeline(codec, codec, NoPrivacy()), ServerPipeline(codec, codec, FedAvg(), NoPrivacy())


def test_bytes_counted_are_the_encoded_payload_lengths():
    client, server = _pipelines()
    glob = _state([0.0, 0.0], [[0.0]])
    payload = server.broadcast(glob)
    start = client.receive(payload)
    update = client.finish(0, start, _state([1.0, 1.0], [[1.0]]), 5, torch.Generator(), {})
    assert update.num_bytes == len(update.payload) == len(IdentityCodec().encode(_state([1.0, 1.0], [[1.0]])))
    _, report = server.aggregate(glob, [update, update], torch.Generator())
    assert report.uplink_bytes == 2 * len(update.payload)


def test_server_rejects_malformed_updates_and_aggregates_the_rest():
    client, server = _pipelines()
    glob = _state([0.0, 0.0], [[0.0]])
    good = client.finish(0, glob, _state([2.0, 2.0], [[2.0]]), 1, torch.Generator(), {})
    nan = client.finish(1, glob, _state([float("nan"), 0.0], [[0.0]]), 1, torch.Generator(), {})
    shape = ClientUpdate(2, 1, IdentityCodec().encode({"a": torch.zeros(3), "b": torch.zeros(1, 1)}))
    names = ClientUpdate(3, 1, IdentityCodec().encode({"a": torch.zeros(2)}))
    garbage = ClientUpdate(4, 1, b"not a payload")
    new, report = server.aggregate(glob, [good, nan, shape, names, garbage], torch.Generator())
    assert report.accepted == [0]
    assert set(report.rejected) == {1, 2, 3, 4}
    assert "NaN" in report.rejected[1] and "shape" in report.rejected[2]
    assert torch.equal(new["a"], torch.tensor([2.0, 2.0]))


def test_no_valid_update_keeps_the_global_state():
    _, server = _pipelines()
    glob = _state([1.0, 1.0], [[1.0]])
    new, report = server.aggregate(glob, [ClientUpdate(0, 1, b"junk")], torch.Generator())
    assert new is glob and report.accepted == []
