"""Phone audio (pcm.py): the μ-law codec against an independent G.711 reference, frames, loudness."""

from __future__ import annotations

import math

import pcm

SEG_END = (0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF)  # seg_uend


def reference_encode(sample: int) -> int:
    """G.711 μ-law as the classic reference code (Sun's g711.c) writes it: 14-bit magnitude, segment search."""
    pcm_val = sample >> 2
    mask = 0x7F if pcm_val < 0 else 0xFF
    pcm_val = -pcm_val if pcm_val < 0 else pcm_val
    pcm_val = min(pcm_val, 8159) + (0x84 >> 2)
    seg = next((i for i, end in enumerate(SEG_END) if pcm_val <= end), 8)
    if seg >= 8:
        return 0x7F ^ mask
    return ((seg << 4) | ((pcm_val >> (seg + 1)) & 0xF)) ^ mask


def reference_decode(u: int) -> int:
    u = ~u & 0xFF
    t = ((u & 0x0F) << 3) + 0x84
    t <<= (u & 0x70) >> 4
    return 0x84 - t if u & 0x80 else t - 0x84


def test_decoding_matches_the_reference_for_all_256_codes() -> None:
    assert [pcm.DECODE[u] for u in range(256)] == [reference_decode(u) for u in range(256)]
    assert (pcm.DECODE[0x00], pcm.DECODE[0x80], pcm.DECODE[0xFF]) == (-32124, 32124, 0)


def test_encoding_matches_the_reference_for_every_16_bit_sample() -> None:
    samples = range(-32768, 32768)
    ours = pcm.pcm16_to_ulaw(b"".join(s.to_bytes(2, "little", signed=True) for s in samples))
    assert list(ours) == [reference_encode(s) for s in samples]


def test_a_decoded_code_encodes_back_to_itself() -> None:
    codes = bytes(u for u in range(256) if u != 0x7F)  # (0x7F and 0xFF both decode to zero; zero encodes to 0xFF)
    assert pcm.pcm16_to_ulaw(pcm.ulaw_to_pcm16(codes)) == codes


def test_audio_is_padded_with_silence_to_whole_frames_and_timed() -> None:
    assert pcm.pad(b"\x01" * 161) == b"\x01" * 161 + bytes([pcm.SILENCE]) * 159
    assert pcm.pad(b"\x01" * 320) == b"\x01" * 320 and pcm.pad(b"") == b""
    assert (pcm.milliseconds(b"\x00" * 160), pcm.milliseconds(b"\x00" * 8000)) == (20, 1000)


def test_loudness_is_minus_infinity_for_silence_and_near_minus_3_db_for_a_full_scale_sine() -> None:
    sine = pcm.pcm16_to_ulaw(
        b"".join(
            int(32000 * math.sin(2 * math.pi * 440 * n / 8000)).to_bytes(2, "little", signed=True) for n in range(8000)
        )
    )
    assert pcm.energy_db(bytes([pcm.SILENCE]) * 160) == pcm.energy_db(b"") == -math.inf
    assert abs(pcm.energy_db(sine) - 20 * math.log10(32000 / 32768 / math.sqrt(2))) < 0.2
