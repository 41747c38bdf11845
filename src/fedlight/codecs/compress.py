"""Lossless compression of another codec's payload (zlib or lzma, both in the standard library).

Compression pays off where the inner payload is redundant: sorted sparse indices, low-entropy int8/4-bit
codes, JSON headers of many small tensors; fp32 noise barely shrinks. Both formats carry a checksum
(zlib: Adler-32, xz: CRC-64), so besides saving bytes this wrapper makes a corrupted or truncated
payload fail loudly instead of decoding to wrong numbers.
"""

from __future__ import annotations

import lzma
import zlib
from typing import Any, ClassVar, Literal

import torch

from fedlight.codecs import wire
from fedlight.codecs.base import Codec
from fedlight.codecs.identity import IdentityCodec
from fedlight.codecs.quantize import expect
from fedlight.core.state import State
from fedlight.hookspecs import hookimpl

ALGORITHMS = ("zlib", "lzma")
#: without a reference state to bound it, refuse to inflate a payload beyond this (a decompression
#: bomb); decoding against a reference bounds inflation by the inner codec's longest legitimate payload
MAX_INFLATED_BYTES = 2**34
#: memory liblzma needs to decode xz presets 0-9 (xz(1) manual), plus 1 MiB: a stream asking for more
#: (a crafted dictionary size) is refused before it is allocated
_LZMA_MEMLIMIT = [(m + 1) << 20 for m in (1, 2, 3, 5, 5, 9, 9, 17, 33, 65)]


class CompressCodec(Codec):
    """Lossless zlib/lzma compression of an inner codec's payload; the error bound is the inner codec's."""

    name = "compress"
    max_rel_error = 0.0  # of the default inner codec (identity); an instance carries its inner's bound
    example_args: ClassVar[dict[str, Any]] = {"algorithm": "zlib", "level": 1}

    def __init__(
        self,
        inner: Codec | None = None,
        algorithm: Literal["zlib", "lzma"] = "zlib",
        level: int = 6,
        error_feedback: bool = False,
    ) -> None:
        """``inner``: the codec whose payload is compressed (identity when omitted); ``algorithm``: zlib
        (fast) or lzma (smaller, slower); ``level``: 0-9. Error feedback is on when set here or on ``inner``."""
        inner = IdentityCodec() if inner is None else inner
        if not isinstance(inner, Codec):
            raise ValueError(f"compress.inner must be a codec (e.g. {{class_path: int8}}), got {type(inner).__name__}")
        if isinstance(inner, CompressCodec):
            raise ValueError("compress.inner must not itself be `compress`: compressing twice only adds bytes")
        if algorithm not in ALGORITHMS:
            raise ValueError(f"compress.algorithm must be one of {list(ALGORITHMS)}, got {algorithm!r}")
        if not isinstance(level, int) or not 0 <= level <= 9:
            raise ValueError(f"compress.level must be an integer in 0..9, got {level!r}")
        super().__init__(error_feedback=error_feedback or inner.error_feedback)
        self.inner = inner
        self.algorithm = algorithm
        self.level = level
        self.max_rel_error = inner.max_rel_error  # type: ignore[misc]  # per instance: the inner codec's bound

    def wire_params(self) -> dict[str, Any]:
        return {"algorithm": self.algorithm, "inner": self.inner.name}

    def to_buffers(self, state: State) -> list[wire.Buffer]:
        raw = self.inner.encode(state)
        if self.algorithm == "zlib":
            packed = zlib.compress(raw, self.level)
        else:
            packed = lzma.compress(raw, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=self.level)
        return [
            wire.Buffer("compressed", torch.frombuffer(bytearray(packed), dtype=torch.uint8)),
            wire.Buffer("size", torch.tensor(len(raw), dtype=torch.int64)),
        ]

    def _inflate(self, packed: bytes, size: int) -> bytes:
        """Decompress at most ``size + 1`` bytes and insist on one complete stream of exactly ``size``."""
        try:
            if self.algorithm == "zlib":
                z = zlib.decompressobj()
                raw = z.decompress(packed, size + 1)
                complete = z.eof and not z.unused_data and not z.unconsumed_tail
            else:
                x = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=_LZMA_MEMLIMIT[self.level])
                raw = x.decompress(packed, size + 1)
                complete = x.eof and not x.unused_data
        except (zlib.error, lzma.LZMAError, EOFError, ValueError, MemoryError) as err:
            raise wire.PayloadError(f"compress: {self.algorithm} stream is corrupt: {err}") from None
        if len(raw) != size or not complete:
            raise wire.PayloadError(
                f"compress: {self.algorithm} stream is truncated, corrupt or has trailing data "
                f"(inflated {len(raw)} bytes, header says {size}, stream complete: {complete})"
            )
        return raw

    def from_buffers(
        self, buffers: list[wire.Buffer], meta: dict[str, Any], reference: wire.Spec | None = None
    ) -> State:
        for key, value in self.wire_params().items():
            if meta.get(key) != value:
                raise wire.PayloadError(
                    f"compress payload has {key}={meta.get(key)!r}, this codec is configured with {value!r}"
                )
        if [b.name for b in buffers] != ["compressed", "size"]:
            raise wire.PayloadError(
                f"compress payload: buffers {[b.name for b in buffers]}, expected ['compressed', 'size']"
            )
        packed, size = buffers[0].tensor, buffers[1].tensor
        expect(packed, torch.uint8, None, "compressed stream")
        expect(size, torch.int64, (), "inflated size")
        limit = MAX_INFLATED_BYTES if reference is None else self.inner.max_payload_bytes(reference)
        if packed.dim() != 1 or not 0 < int(size) <= limit:
            raise wire.PayloadError(
                f"compress payload: a stream of shape {tuple(packed.shape)} inflating to {int(size)} bytes is invalid "
                f"(the inner {self.inner.name} payload of this state is at most {limit} bytes)"
            )
        return self.inner.decode(self._inflate(packed.numpy().tobytes(), int(size)), reference=reference)


@hookimpl
def fedlight_codecs() -> list[type]:
    return [CompressCodec]
