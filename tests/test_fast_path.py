"""The in-process fast path (issue 18): shortcuts that must change nothing but the time.

* the broadcast is decoded once per round, not once per client;
* a lossless (``passthrough``) uplink payload built in this process is not decoded again by the
  server: the tensors it decodes to are handed over with it, still validated, and its bytes are
  still counted as ``len()`` of the real encoding.
Each is checked against the slow path bit for bit on seeded, generated states (hostile values included).
"""

from __future__ import annotations

import pytest
import torch

from fedlight.aggregators.fedavg import FedAvg
from fedlight.codecs.half import Fp16Codec
from fedlight.codecs.identity import IdentityCodec
from fedlight.core.client import ClientPipeline
from fedlight.core.server import ServerPipeline
from fedlight.privacy.base import Privacy
from fedlight.privacy.none import NoPrivacy


def random_state(gen: torch.Generator, hostile: bool) -> dict[str, torch.Tensor]:
    names = [f"blocks.{i}.{k}" for i in range(int(torch.randint(1, 5, (1,), generator=gen))) for k in ("bias", "w")]
    state = {}
    for name in names:
        shape = tuple(int(s) for s in torch.randint(0, 6, (int(torch.randint(0, 4, (1,), generator=gen)),), generator=gen))
        value = torch.randn(shape, generator=gen) * 10 ** float(torch.randint(-30, 30, (1,), generator=gen))
        if hostile and value.numel():
            flat = value.view(-1)
            flat[int(torch.randint(0, flat.numel(), (1,), generator=gen))] = float(
                [-0.0, float("nan"), float("inf"), 1e-45, 3.4e38][int(torch.randint(0, 5, (1,), generator=gen))]
            )
        state[name] = value
    return state


def bits(state: dict[str, torch.Tensor]) -> dict[str, bytes]:
    return {k: v.contiguous().view(-1).view(torch.uint8).numpy().tobytes() for k, v in state.items()}


def pipelines(uplink=None, privacy: Privacy | None = None):
    uplink, privacy = uplink or IdentityCodec(), privacy or NoPrivacy()
    client = ClientPipeline(uplink, IdentityCodec(), privacy)
    server = ServerPipeline(uplink, IdentityCodec(), FedAvg(), privacy, max_norm_over_median=None)
    return client, server


@pytest.mark.parametrize("seed", range(40))
def test_remembered_tensors_are_what_the_payload_decodes_to_and_bytes_are_its_length(seed):
    gen = torch.Generator().manual_seed(seed)
    start = random_state(gen, hostile=seed % 2 == 1)  # NaN, Inf, -0, denormals, 3.4e38 reach the delta
    trained = {k: v + random_state_like(v, gen, hostile=seed % 4 == 1) for k, v in start.items()}
    client, _ = pipelines()
    update = client.finish(0, start, trained, 3, torch.Generator(), {})
    assert client.sent_state is not None
    assert bits(client.sent_state) == bits(IdentityCodec().decode(update.payload, reference=start))
    assert update.num_bytes == len(IdentityCodec().encode(client.sent_state)) == len(update.payload)


def random_state_like(value: torch.Tensor, gen: torch.Generator, hostile: bool) -> torch.Tensor:
    out = torch.randn(value.shape, generator=gen)
    if hostile and out.numel():
        out.view(-1)[0] = float("nan")
    return out


@pytest.mark.parametrize("seed", range(12))
def test_aggregate_with_remembered_updates_equals_decoding_them(seed):
    """Same new global state, same accepted/rejected and the same counted bytes, with and without the shortcut."""
    gen = torch.Generator().manual_seed(1000 + seed)
    global_state = random_state(gen, hostile=False)
    results = []
    for remember in (False, True):
        client, server = pipelines()
        updates = []
        for c in range(5):
            g = torch.Generator().manual_seed(seed * 10 + c)
            trained = {k: v + random_state_like(v, g, hostile=c == 3 and seed % 3 == 0) for k, v in global_state.items()}
            update = client.finish(c, global_state, trained, c + 1, torch.Generator(), {})
            if remember:
                server.remember(update.payload, client.sent_state)
            updates.append(update)
        new_global, report = server.aggregate(global_state, updates, torch.Generator().manual_seed(0))
        results.append((bits(new_global), report.accepted, report.rejected, report.uplink_bytes))
    assert results[0] == results[1]
    assert results[1][3] == sum(len(u.payload) for u in updates)


def test_only_the_very_payload_object_skips_decoding(monkeypatch):
    """A payload with equal bytes that did not come from this process's client (a peer, an attack) is decoded."""
    state = {"w": torch.randn(4)}
    client, server = pipelines()
    update = client.finish(0, {"w": torch.zeros(4)}, state, 1, torch.Generator(), {})
    server.remember(update.payload, client.sent_state)
    calls = []
    decode = server.uplink.decode
    monkeypatch.setattr(server.uplink, "decode", lambda *a, **k: calls.append(1) or decode(*a, **k))
    foreign = type(update)(0, 1, bytes(bytearray(update.payload)))
    server.aggregate({"w": torch.zeros(4)}, [foreign], torch.Generator())
    assert calls == [1]
    server.remember(update.payload, client.sent_state)
    server.aggregate({"w": torch.zeros(4)}, [update], torch.Generator())
    assert calls == [1]  # remembered: not decoded
    server.aggregate({"w": torch.zeros(4)}, [update], torch.Generator())
    assert calls == [1, 1]  # forgotten after one aggregation


def test_no_shortcut_for_lossy_codecs_error_feedback_or_non_fp32_deltas():
    start, trained = {"w": torch.zeros(3)}, {"w": torch.randn(3)}
    client, _ = pipelines(uplink=Fp16Codec())
    client.finish(0, start, trained, 1, torch.Generator(), {})
    assert client.sent_state is None
    client, _ = pipelines(uplink=IdentityCodec(error_feedback=True))
    client.finish(0, start, trained, 1, torch.Generator(), {})
    assert client.sent_state is None

    class ToDouble(NoPrivacy):
        def client_transform(self, delta, generator):
            return {k: v.double() for k, v in delta.items()}

    client, _ = pipelines(privacy=ToDouble())
    client.finish(0, start, trained, 1, torch.Generator(), {})
    assert client.sent_state is None


def test_a_round_decodes_the_broadcast_once_and_counts_it_per_client(tmp_path, monkeypatch):
    from conftest import round_callback, run_fit, vision_config

    from fedlight.core.client import ClientPipeline as Pipeline

    calls = []
    receive = Pipeline.receive
    monkeypatch.setattr(Pipeline, "receive", lambda self, payload: calls.append(len(payload)) or receive(self, payload))
    cfg = vision_config(tmp_path, federation={"rounds": 2, "clients_per_round": 3, "local_steps": 1, "checkpoint_every": 0})
    fed = round_callback(run_fit(cfg, tmp_path))
    assert len(calls) == 2  # one decode per round, three clients each
    payload = len(IdentityCodec().encode(fed.global_state))
    assert [r["downlink_bytes"] for r in fed.history[1:]] == [3 * payload, 3 * payload]
    assert [r["uplink_bytes"] for r in fed.history[1:]] == [3 * payload, 3 * payload]
