"""Codec contract (generated from the registry, every codec alike), error feedback, and exact quantiser math."""

from __future__ import annotations

import json
import random
import struct
import zlib

import pytest
import torch

from fedlight.codecs import wire
from fedlight.codecs.base import Codec
from fedlight.codecs.compress import CompressCodec
from fedlight.codecs.half import Bf16Codec, Fp16Codec
from fedlight.codecs.quantize import Int4Codec, Int8Codec, pack_nibbles, unpack_nibbles
from fedlight.codecs.sparsify import RandomKCodec, TopKCodec, index_dtype
from fedlight.core.client import ClientPipeline
from fedlight.core.server import validate_delta
from fedlight.plugins import build_registry
from fedlight.privacy.none import NoPrivacy

REGISTRY = build_registry(autoload=False)
CODECS = [REGISTRY.entries["codecs"][name].cls for name in REGISTRY.names("codecs")]


@pytest.fixture(params=CODECS, ids=lambda cls: cls.name)
def codec(request) -> Codec:
    cls = request.param
    return cls(**cls.example_args)


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"layer.lora_A": torch.randn(8, 24, generator=g), "bias": torch.randn(5, generator=g) * 1e-3}


def _check_close(codec: Codec, x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> None:
    assert list(y) == list(x)
    for name, value in x.items():
        ref = value.detach().float()
        out = y[name]
        assert out.dtype == torch.float32 and out.shape == ref.shape, name
        if codec.max_rel_error == 0:
            assert torch.equal(out, ref), name
        elif ref.numel():
            scale = float(ref.abs().max())
            # +1e-6: fp32 arithmetic in scales and products, far below every documented bound
            assert float((out - ref).abs().max()) <= (codec.max_rel_error + 1e-6) * scale, name


# ---------------------------------------------------------------------------------------------
# Contract: every registered codec
# ---------------------------------------------------------------------------------------------


def test_codec_is_a_well_formed_plugin(codec: Codec) -> None:
    cls = type(codec)
    assert cls.summary() != "(no description)" and "\n" not in cls.summary()
    assert 0.0 <= codec.max_rel_error <= 1.0
    assert cls(**cls.example_args, error_feedback=True).error_feedback is True
    assert codec.error_feedback is False


def test_round_trip_within_the_documented_bound(codec: Codec) -> None:
    g = torch.Generator().manual_seed(1)
    state = {
        **_state(),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(-2.5),
        "transposed": torch.randn(6, 9, generator=g).t(),  # non-contiguous
        "zeros": torch.zeros(4, 4),
        "tiny": torch.randn(3, 7, generator=g) * 1e-9,  # deltas of a low learning rate must not vanish
        "bf16": torch.randn(4, 6, generator=g).to(torch.bfloat16),
        "fp16": torch.randn(33, generator=g).to(torch.float16),
    }
    assert not state["transposed"].is_contiguous()
    _check_close(codec, state, codec.decode(codec.encode(state)))
    assert codec.encode(state) == codec.encode(state)  # deterministic, stochastic/random codecs included


def test_round_trip_of_a_large_tensor(codec: Codec) -> None:
    state = {"w": torch.randn(1000, 1000, generator=torch.Generator().manual_seed(2))}
    _check_close(codec, state, codec.decode(codec.encode(state)))


def test_empty_state(codec: Codec) -> None:
    assert codec.decode(codec.encode({})) == {}


def test_bytes_counted_are_the_payload(codec: Codec) -> None:
    start = _state()
    trained = {k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(3)) for k, v in start.items()}
    pipeline = ClientPipeline(codec, codec, NoPrivacy())
    update = pipeline.finish(0, start, trained, 10, torch.Generator(), {})
    delta = {k: trained[k] - start[k] for k in start}
    assert update.num_bytes == len(update.payload) == len(codec.encode(delta))
    _check_close(codec, delta, codec.decode(update.payload))


def _header_end(payload: bytes) -> int:
    (hlen,) = struct.unpack_from("<I", payload, 4)
    return 8 + hlen


def test_truncated_and_trailing_garbage_rejected(codec: Codec) -> None:
    payload = codec.encode(_state())
    for n in range(len(payload)):
        with pytest.raises(wire.PayloadError):
            codec.decode(payload[:n])
    for extra in (b"\0", b"garbage" * 3):
        with pytest.raises(wire.PayloadError):
            codec.decode(payload + extra)


def _reseal(payload: bytearray) -> bytes:
    """Recompute the trailing CRC32, as a buggy or hostile encoder would: the decoder's own checks remain."""
    body = bytes(payload[:-4])
    return body + struct.pack("<I", zlib.crc32(body))


def test_any_flipped_byte_is_rejected_by_the_checksum(codec: Codec) -> None:
    """Flip one byte anywhere (magic, length, header, data, checksum): always rejected, never decoded."""
    payload = codec.encode(_state())
    rng = random.Random(0)
    for pos in range(len(payload)):
        for flip in {1 << (pos % 8), rng.randrange(1, 256)}:
            bad = bytearray(payload)
            bad[pos] ^= flip
            with pytest.raises(wire.PayloadError):
                codec.decode(bytes(bad))
    bad = bytearray(payload)
    bad[len(bad) // 2] ^= 0x01
    with pytest.raises(wire.PayloadError, match="checksum mismatch"):
        codec.decode(bytes(bad))


def test_header_bit_flips_behind_a_valid_checksum_never_give_silent_wrong_data(codec: Codec) -> None:
    """With the checksum recomputed, every single-bit flip in the magic, length and JSON header is still a
    PayloadError, or (a tensor renamed, which no codec can tell from a real name) an update the server's
    validation rejects."""
    state = _state()
    payload = bytearray(codec.encode(state))
    reference = codec.decode(bytes(payload))
    for pos in range(_header_end(payload)):
        for bit in range(8):
            bad = bytearray(payload)
            bad[pos] ^= 1 << bit
            try:
                out = codec.decode(_reseal(bad))
            except wire.PayloadError:
                continue
            if list(out) == list(reference) and all(out[k].shape == reference[k].shape for k in out):
                assert all(torch.equal(out[k], reference[k]) for k in out), f"silent change at byte {pos} bit {bit}"
            else:
                with pytest.raises(ValueError):
                    validate_delta(out, state)


def test_data_bit_flips_behind_a_valid_checksum_raise_only_payload_errors(codec: Codec) -> None:
    """Corrupt data resealed with a valid checksum may decode, but never crashes with another error type."""
    payload = codec.encode(_state())
    rng = random.Random(0)
    start = _header_end(payload)
    for _ in range(300):
        bad = bytearray(payload)
        bad[rng.randrange(start, len(bad) - 4)] ^= 1 << rng.randrange(8)
        try:
            out = codec.decode(_reseal(bad))
        except wire.PayloadError:
            continue
        assert all(v.dtype == torch.float32 for v in out.values())


def test_wire_format_is_versioned_and_other_versions_are_rejected() -> None:
    payload = Int8Codec().encode(_state())
    assert payload[:4] == b"FLW2" == wire.MAGIC and wire.VERSION == 2
    (crc,) = struct.unpack_from("<I", payload, len(payload) - 4)
    assert crc == zlib.crc32(payload[:-4])
    assert len(payload) == wire.framed_size(_header_end(payload) - 8, len(payload) - _header_end(payload) - 4)
    # version 1 (no checksum): same layout without the trailer, magic FLW1
    v1 = b"FLW1" + payload[4:-4]
    with pytest.raises(wire.PayloadError, match=r"version '1'.*only version 2"):
        Int8Codec().decode(v1)
    with pytest.raises(wire.PayloadError, match=r"version '9'"):
        Int8Codec().decode(_reseal(bytearray(b"FLW9" + payload[4:])))
    with pytest.raises(wire.PayloadError, match="not a fedlight payload"):
        Int8Codec().decode(b"PK\x03\x04" + payload[4:])


def test_layout_is_exactly_what_encode_writes(codec: Codec) -> None:
    """The layout a decoder checks against is the encoder's own, and the payload-size bound is exact."""
    g = torch.Generator().manual_seed(4)
    state = {**_state(), "scalar": torch.tensor(1.5), "empty": torch.zeros(0, 3), "odd": torch.randn(3, 7, generator=g)}
    spec = wire.spec_of(state, torch.float32)
    payload = codec.encode(state)
    layout = codec.layout(spec)
    if layout is None:  # compress: the stream length depends on the data; the bound must still hold
        assert codec.max_payload_bytes(spec) >= len(payload)
    else:
        header = json.loads(payload[8:_header_end(payload)])
        assert [(e["name"], e["dtype"], e["shape"]) for e in header["buffers"]] == [
            (b.name, wire.dtype_name(b.dtype), list(b.shape)) for b in layout
        ]
        assert codec.max_payload_bytes(spec) == len(payload)
    for reference in (state, spec):
        _check_close(codec, state, codec.decode(payload, reference=reference))


def test_decoding_against_another_reference_is_a_payload_error(codec: Codec) -> None:
    """Right format, wrong global state (shape, zero dimension, name, order, count): rejected, never decoded."""
    state = _state()
    payload = codec.encode(state)
    a, b = list(state)
    others = [
        {a: torch.zeros(8, 23), b: state[b]},
        {a: torch.zeros(24, 8), b: state[b]},
        {a: torch.zeros(0, 24), b: state[b]},
        {a: torch.zeros(8, 24, 0), b: state[b]},
        {a: state[a], "other": state[b]},
        {b: state[b], a: state[a]},
        {a: state[a]},
        {**state, "extra": torch.zeros(2)},
        {},
    ]
    for reference in others:
        with pytest.raises(wire.PayloadError):
            codec.decode(payload, reference=reference)
    with pytest.raises(wire.PayloadError):  # a decoded dtype the reference does not allow
        codec.decode(payload, reference={k: wire.TensorSpec(tuple(v.shape), torch.float64) for k, v in state.items()})


def test_payload_of_another_codec_rejected(codec: Codec) -> None:
    other = Int8Codec() if codec.name != "int8" else Bf16Codec()
    with pytest.raises(wire.PayloadError, match="codec"):
        codec.decode(other.encode(_state()))


# ---------------------------------------------------------------------------------------------
# Error feedback through the client pipeline
# ---------------------------------------------------------------------------------------------


def test_topk_error_feedback_transmitted_sum_tracks_true_sum() -> None:
    g = torch.Generator().manual_seed(0)
    drift = {"a": torch.randn(40, 25, generator=g), "b": torch.randn(500, generator=g)}
    zero = {k: torch.zeros_like(v) for k, v in drift.items()}

    def run(error_feedback: bool) -> tuple[float, list[float]]:
        codec = TopKCodec(density=0.01, error_feedback=error_feedback)
        pipeline, client_state = ClientPipeline(codec, codec, NoPrivacy()), {}
        true_sum = {k: torch.zeros_like(v) for k, v in drift.items()}
        sent_sum = {k: torch.zeros_like(v) for k, v in drift.items()}
        residual_norms = []
        gen = torch.Generator().manual_seed(1)
        for _ in range(200):
            delta = {k: v + torch.randn(v.shape, generator=gen) for k, v in drift.items()}
            update = pipeline.finish(0, zero, delta, 1, gen, client_state)
            decoded = codec.decode(update.payload)
            for k in drift:
                true_sum[k] += delta[k]
                sent_sum[k] += decoded[k]
            if error_feedback:
                residual_norms.append(float(torch.cat([r.reshape(-1) for r in client_state["residual"].values()]).norm()))
                # what was lost is exactly what is kept: transmitted sum + residual == true sum
                for k in drift:
                    torch.testing.assert_close(sent_sum[k] + client_state["residual"][k], true_sum[k], rtol=0, atol=1e-3)
        num = sum(float((true_sum[k] - sent_sum[k]).norm() ** 2) for k in drift) ** 0.5
        den = sum(float(true_sum[k].norm() ** 2) for k in drift) ** 0.5
        return num / den, residual_norms

    rel_err, norms = run(error_feedback=True)
    rel_err_without, _ = run(error_feedback=False)
    assert rel_err < 0.25 < 0.9 < rel_err_without
    # bounded: the residual saturates after ~1/density steps (here at ~1.6e3) instead of growing with t
    assert max(norms[150:]) <= 1.1 * max(norms[100:150])


# ---------------------------------------------------------------------------------------------
# Exact math and per-codec behaviour
# ---------------------------------------------------------------------------------------------


def _buffers(codec: Codec, payload: bytes) -> dict[str, torch.Tensor]:
    return {b.name: b.tensor for b in wire.unpack(payload)[0]}


def test_int8_codes_of_a_known_tensor() -> None:
    x = torch.tensor([[-1.27, 0.0, 0.5, 1.27], [0.1, -0.2, 0.3, 0.0]])
    bufs = _buffers(Int8Codec(), Int8Codec().encode({"w": x}))
    assert bufs["w#q"].tolist() == [[-127, 0, 50, 127], [10, -20, 30, 0]]
    torch.testing.assert_close(bufs["w#s"], torch.tensor([0.01]))
    bufs = _buffers(Int8Codec(granularity="channel"), Int8Codec(granularity="channel").encode({"w": x}))
    assert bufs["w#q"].tolist() == [[-127, 0, 50, 127], [42, -85, 127, 0]]  # 0.1/0.3*127 = 42.33
    torch.testing.assert_close(bufs["w#s"], torch.tensor([0.01, 0.3 / 127]))


def test_int8_nearest_rounding_bound_is_half_a_step() -> None:
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    for granularity in ("tensor", "channel", "block"):
        codec = Int8Codec(granularity=granularity, block_size=100)
        out = codec.decode(codec.encode({"x": x.reshape(100, 100)}))["x"].reshape(-1)
        assert float((out - x).abs().max()) <= (1 / 254 + 1e-6) * float(x.abs().max())


def test_int4_packing_and_codes() -> None:
    codes = torch.tensor([-7, 7, 0, 1, -1], dtype=torch.int8)
    packed = pack_nibbles(codes)
    assert packed.tolist() == [0x01 | 0xF0, 0x08 | 0x90, 0x07]  # +8 offsets, low nibble first, pad 0
    assert torch.equal(unpack_nibbles(packed, 5, "t"), codes)
    with pytest.raises(wire.PayloadError, match="padding"):
        unpack_nibbles(torch.tensor([0x01 | 0xF0, 0x08 | 0x90, 0x17], dtype=torch.uint8), 5, "t")
    with pytest.raises(wire.PayloadError, match="code 0"):
        unpack_nibbles(torch.tensor([0x10], dtype=torch.uint8), 2, "t")
    codec = Int4Codec(granularity="tensor")
    x = torch.tensor([0.7, -0.35, 0.1, 0.0, -0.7])
    bufs = _buffers(codec, codec.encode({"w": x}))
    assert bufs["w#q"].numel() == 3 and bufs["w#shape"].tolist() == [5]
    torch.testing.assert_close(codec.decode(codec.encode({"w": x}))["w"], torch.tensor([0.7, -0.4, 0.1, 0.0, -0.7]))


def test_stochastic_rounding_is_unbiased_and_seeded() -> None:
    x = torch.full((20_000,), 0.3)
    x[0] = 1.27  # scale 0.01: 0.3 is exactly 30 steps, so shift to 0.305 = 30.5 steps
    x[1:] = 0.305
    codec = Int8Codec(stochastic=True, seed=3)
    out = codec.decode(codec.encode({"x": x}))["x"][1:]
    assert set(torch.round(out * 100).unique().tolist()) == {30.0, 31.0}
    assert abs(float(out.mean()) - 0.305) < 1e-3  # nearest rounding would give 0.31 (or 0.30) everywhere
    assert codec.encode({"x": x}) == Int8Codec(stochastic=True, seed=3).encode({"x": x})
    assert codec.encode({"x": x}) != Int8Codec(stochastic=True, seed=4).encode({"x": x})


def test_sparsifiers_keep_exact_values_and_smallest_index_dtype() -> None:
    assert [index_dtype(n) for n in (1, 256, 257, 32768, 32769, 2**31, 2**31 + 1)] == [
        torch.uint8, torch.uint8, torch.int16, torch.int16, torch.int32, torch.int32, torch.int64,
    ]  # fmt: skip
    x = torch.tensor([0.1, -5.0, 0.2, 3.0, -0.3, 0.0, 0.05, 1.0, 0.0, 0.0])
    codec = TopKCodec(density=0.3)
    payload = codec.encode({"w": x})
    bufs = _buffers(codec, payload)
    assert bufs["w#i"].dtype == torch.uint8 and bufs["w#i"].tolist() == [1, 3, 7]
    assert codec.decode(payload)["w"].tolist() == [0, -5.0, 0, 3.0, 0, 0, 0, 1.0, 0, 0]
    big = torch.randn(300, 300, generator=torch.Generator().manual_seed(0))
    for codec in (TopKCodec(density=0.05), RandomKCodec(density=0.05, seed=7)):
        out = codec.decode(codec.encode({"w": big}))["w"]
        kept = out != 0
        assert int(kept.sum()) == 4500 and torch.equal(out[kept], big[kept])
        assert _buffers(codec, codec.encode({"w": big}))["w#i"].dtype == torch.int32
    topk_out = TopKCodec(density=0.05).decode(TopKCodec(density=0.05).encode({"w": big}))["w"]
    assert float(big[topk_out == 0].abs().max()) <= float(big[topk_out != 0].abs().min())


def test_randk_is_reproducible_and_changes_with_seed_name_and_contents() -> None:
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))

    def mask(codec: RandomKCodec, name: str = "w", value: torch.Tensor = x) -> torch.Tensor:
        return codec.decode(codec.encode({name: value}))[name] != 0

    assert torch.equal(mask(RandomKCodec(0.1, seed=1)), mask(RandomKCodec(0.1, seed=1)))
    assert not torch.equal(mask(RandomKCodec(0.1, seed=1)), mask(RandomKCodec(0.1, seed=2)))
    assert not torch.equal(mask(RandomKCodec(0.1, seed=1)), mask(RandomKCodec(0.1, seed=1), "v"))
    assert not torch.equal(mask(RandomKCodec(0.1, seed=1)), mask(RandomKCodec(0.1, seed=1), value=x + 1))


def test_sparse_decoder_rejects_bad_indices() -> None:
    codec = TopKCodec(density=0.3)
    payload = codec.encode({"w": torch.arange(10.0)})
    for bad_indices in ([9, 8, 7], [7, 7, 9], [7, 8, 10]):
        buffers, meta = wire.unpack(payload)
        buffers[0] = wire.Buffer("w#i", torch.tensor(bad_indices, dtype=torch.uint8))
        with pytest.raises(wire.PayloadError, match="strictly increasing"):
            codec.decode(wire.pack(buffers, meta))
    with pytest.raises(wire.PayloadError, match="density"):
        TopKCodec(density=0.2).decode(payload)


def test_fp16_scales_instead_of_underflowing_or_overflowing() -> None:
    codec = Fp16Codec()
    for x in (torch.tensor([1e-9, -3e-10, 2e-12]), torch.tensor([1e6, -7e5, 3.0])):
        assert float(x.to(torch.float16).float().sub(x).abs().max()) > Fp16Codec.max_rel_error * float(x.abs().max())
        out = codec.decode(codec.encode({"x": x}))["x"]
        assert float((out - x).abs().max()) <= Fp16Codec.max_rel_error * float(x.abs().max())
    assert _buffers(codec, codec.encode({"x": torch.ones(3)}))["x#h"].dtype == torch.float16


def test_quantiser_decoder_checks_its_own_parameters() -> None:
    payload = Int4Codec(block_size=16).encode(_state())
    with pytest.raises(wire.PayloadError, match="block_size"):
        Int4Codec(block_size=32).decode(payload)
    with pytest.raises(wire.PayloadError, match="granularity"):
        Int4Codec(granularity="tensor").decode(payload)


@pytest.mark.parametrize("algorithm", ["zlib", "lzma"])
def test_compress_wraps_an_inner_codec_and_checks_its_stream(algorithm: str) -> None:
    inner = Int8Codec(granularity="channel")
    codec = CompressCodec(inner=inner, algorithm=algorithm)
    assert codec.max_rel_error == inner.max_rel_error
    sparse = {"w": torch.zeros(200, 50)}
    sparse["w"][::7, ::3] = 1.0
    payload = codec.encode(sparse)
    assert len(payload) < len(inner.encode(sparse)) / 4
    torch.testing.assert_close(codec.decode(payload), inner.decode(inner.encode(sparse)))
    # a corrupt stream fails its checksum instead of decoding to wrong numbers
    buffers, meta = wire.unpack(payload)
    stream = bytearray(buffers[0].tensor.numpy().tobytes())
    for pos in range(0, len(stream), max(1, len(stream) // 50)):
        bad = bytearray(stream)
        bad[pos] ^= 0x10
        corrupt = wire.pack([wire.Buffer("compressed", torch.frombuffer(bad, dtype=torch.uint8)), buffers[1]], meta)
        with pytest.raises(wire.PayloadError):
            codec.decode(corrupt)
    header = json.loads(payload[8:_header_end(payload)])
    assert header["meta"] == {"codec": "compress", "algorithm": algorithm, "inner": "int8"}
    with pytest.raises(wire.PayloadError, match="inner"):
        CompressCodec(inner=Int4Codec(), algorithm=algorithm).decode(payload)


def test_compress_takes_error_feedback_from_its_inner_codec() -> None:
    assert CompressCodec(inner=TopKCodec(error_feedback=True)).error_feedback
    assert CompressCodec(inner=TopKCodec(), error_feedback=True).error_feedback
    assert not CompressCodec(inner=TopKCodec()).error_feedback


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: Int8Codec(granularity="row"), "int8.granularity"),  # type: ignore[arg-type]
        (lambda: Int4Codec(block_size=0), "int4.block_size"),
        (lambda: Int8Codec(seed=-1), "int8.seed"),
        (lambda: TopKCodec(density=0.0), "topk.density"),
        (lambda: RandomKCodec(density=1.5), "randk.density"),
        (lambda: RandomKCodec(seed=-2), "randk.seed"),
        (lambda: CompressCodec(algorithm="gzip"), "compress.algorithm"),  # type: ignore[arg-type]
        (lambda: CompressCodec(level=10), "compress.level"),
        (lambda: CompressCodec(inner=CompressCodec()), "compress.inner"),
    ],
)
def test_invalid_arguments_name_the_field(build, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        build()
