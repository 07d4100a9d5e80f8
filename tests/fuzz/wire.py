"""Raw protobuf bytes onto a gRPC method, and a seeded mutator of protobuf wire data.

The calls bypass the client stubs (identity serializers), so malformed wire data - truncated
varints, wrong wire types, invalid UTF-8 in string fields, absurd length prefixes - reaches the
server's parser exactly as sent.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc

# A server bug shows as INTERNAL (an exception the error table did not map) or UNKNOWN; a call
# past its deadline is a hang. Everything else is a clear answer.
CRASH_CODES = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})


@dataclass(slots=True)
class Outcome:
    code: grpc.StatusCode
    details: str
    replies: list[bytes]

    @property
    def ok(self) -> bool:
        return self.code == grpc.StatusCode.OK

    @property
    def crashed(self) -> bool:
        return self.code in CRASH_CODES

    @property
    def hung(self) -> bool:
        return self.code == grpc.StatusCode.DEADLINE_EXCEEDED


RawCall = Callable[[bytes | Sequence[bytes]], Outcome]


def raw_method(channel: grpc.Channel, method: str, shape: str, timeout_s: float = 10.0) -> RawCall:
    """shape: 'unary' (bytes -> bytes), 'server_stream' (bytes -> bytes*), 'client_stream' (bytes* -> bytes)."""
    if shape == "unary":
        stub = channel.unary_unary(method)
    elif shape == "server_stream":
        stub = channel.unary_stream(method)
    elif shape == "client_stream":
        stub = channel.stream_unary(method)
    else:
        raise ValueError(shape)

    def call(request) -> Outcome:
        try:
            if shape == "client_stream":
                replies = [stub(iter(list(request)), timeout=timeout_s)]
            elif shape == "server_stream":
                replies = list(stub(request, timeout=timeout_s))
            else:
                replies = [stub(request, timeout=timeout_s)]
            return Outcome(grpc.StatusCode.OK, "", replies)
        except grpc.RpcError as exc:
            return Outcome(exc.code(), exc.details() or "", [])

    return call


# ---------------------------------------------------------------- wire-format building blocks
def varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32/int64 are ten-byte varints
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field_bytes(number: int, payload: bytes) -> bytes:
    """A length-delimited field (string, bytes, message, packed repeated)."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def field_varint(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(value)


def packed_varints(number: int, values: Sequence[int]) -> bytes:
    return field_bytes(number, b"".join(varint(v) for v in values))


INVALID_UTF8 = (b"\xff", b"\xc3\x28", b"\xe2\x82", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"ok\x80ok")


class Mutator:
    """Seeded structure-unaware mutations of valid messages, plus plain noise."""

    def __init__(self, seeds: Sequence[bytes], rng: random.Random):
        self.seeds = [s for s in seeds] or [b""]
        self.rng = rng

    def __call__(self) -> bytes:
        rng = self.rng
        if rng.random() < 0.1:
            return rng.randbytes(rng.choice((0, 1, 2, 5, 17, 64, 300)))
        data = bytearray(rng.choice(self.seeds))
        for _ in range(rng.choice((1, 1, 2, 3, 6))):
            data = self._mutate_once(data)
        return bytes(data)

    def _mutate_once(self, data: bytearray) -> bytearray:
        rng = self.rng
        op = rng.randrange(11)
        n = len(data)
        if op == 0 and n:  # flip a bit
            i = rng.randrange(n)
            data[i] ^= 1 << rng.randrange(8)
        elif op == 1 and n:  # replace a byte with an interesting one
            data[rng.randrange(n)] = rng.choice((0x00, 0x01, 0x7F, 0x80, 0xFF, 0x0A, 0x12, 0x08))
        elif op == 2:  # insert random bytes
            i = rng.randrange(n + 1)
            data[i:i] = rng.randbytes(rng.randint(1, 8))
        elif op == 3 and n:  # delete a range
            i = rng.randrange(n)
            del data[i:i + rng.randint(1, 8)]
        elif op == 4 and n:  # truncate
            del data[rng.randrange(n):]
        elif op == 5 and n:  # duplicate a chunk (repeated fields, repeated oneofs)
            i = rng.randrange(n)
            chunk = data[i:i + rng.randint(1, 32)]
            data[i:i] = chunk * rng.randint(1, 4)
        elif op == 6:  # splice another seed
            other = rng.choice(self.seeds)
            cut = rng.randrange(len(other) + 1)
            data = data[:rng.randrange(n + 1)] + bytearray(other[cut:])
        elif op == 7:  # an unknown or known field number with a wrong wire type
            number = rng.choice((1, 2, 3, 4, 5, 6, 7, 15, 16, 1000, 536870911))
            wire = rng.choice((0, 1, 2, 3, 4, 5, 6, 7))
            data += varint(number << 3 | wire) + rng.randbytes(rng.randint(0, 9))
        elif op == 8:  # a string field with invalid UTF-8
            data += field_bytes(rng.choice((1, 2, 3, 4)), rng.choice(INVALID_UTF8))
        elif op == 9:  # an absurd length prefix
            data += varint(rng.choice((1, 2, 3)) << 3 | 2) + varint(rng.choice((1 << 31, 1 << 62, 2**64 - 1, 10**6)))
        else:  # an extreme number
            data += varint(rng.choice((1, 2, 4, 5)) << 3 | rng.choice((0, 1, 5)))
            data += rng.choice((varint(2**64 - 1), varint(1 << 31), struct.pack("<d", float("nan")),
                                struct.pack("<f", float("inf"))))
        return data
