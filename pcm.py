"""Phone audio: 8 kHz μ-law (G.711) as Twilio's media streams carry it, and 16-bit PCM for models that want it.

μ-law is a 256-entry table each way (no `audioop`: it is deprecated and gone from Python 3.13). One byte
is one sample, 0.125 ms; a 20 ms frame is 160 bytes.
"""

from __future__ import annotations

import array
import math

RATE = 8000  # samples per second
FRAME = 160  # bytes (samples) in 20 ms
SILENCE = 0xFF  # μ-law for a zero sample


def _decode_byte(u: int) -> int:
    """G.711 μ-law byte to a 16-bit linear sample."""
    u = ~u & 0xFF
    magnitude = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return 0x84 - magnitude if u & 0x80 else magnitude - 0x84


def _encode_sample(sample: int) -> int:
    """A 16-bit linear sample to a G.711 μ-law byte."""
    sign = 0x80 if sample < 0 else 0
    magnitude = min(abs(sample), 32635) + 0x84
    exponent = max(magnitude.bit_length() - 8, 0)
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return ~(sign | (exponent << 4) | mantissa) & 0xFF


DECODE = tuple(_decode_byte(u) for u in range(256))  # μ-law byte -> linear sample
_ENCODE = bytes(_encode_sample(s) for s in range(-32768, 32768, 4))  # linear sample // 4 -> μ-law byte
_SQUARES = tuple(s * s for s in DECODE)


def ulaw_to_pcm16(data: bytes) -> bytes:
    """μ-law bytes to little-endian 16-bit PCM at the same rate."""
    samples = array.array("h", [DECODE[u] for u in data])
    return samples.tobytes()


def pcm16_to_ulaw(data: bytes) -> bytes:
    """Little-endian 16-bit PCM to μ-law bytes at the same rate."""
    samples = array.array("h")
    samples.frombytes(data[: len(data) - len(data) % 2])
    return bytes([_ENCODE[(s + 32768) >> 2] for s in samples])


def energy_db(data: bytes) -> float:
    """The loudness of μ-law audio in dB relative to full scale (-inf for silence or nothing)."""
    if not data:
        return -math.inf
    mean = sum([_SQUARES[u] for u in data]) / len(data)
    return 10 * math.log10(mean / (32768 * 32768)) if mean else -math.inf


def pad(data: bytes) -> bytes:
    """Audio padded with μ-law silence to whole 20 ms frames."""
    short = -len(data) % FRAME
    return data + bytes([SILENCE]) * short if short else data


def milliseconds(data: bytes) -> int:
    """How long μ-law audio lasts."""
    return len(data) * 1000 // RATE
