"""Test images generated on the spot with the stdlib, so the vision check needs no fixtures."""

from __future__ import annotations

import base64
import struct
import zlib

COLORS = {
    "red": (220, 20, 20),
    "green": (20, 180, 20),
    "blue": (20, 40, 220),
    "yellow": (240, 220, 20),
}


def solid_png(rgb: tuple[int, int, int], size: int = 64) -> bytes:
    """An 8-bit RGB PNG of one color, unfiltered scanlines."""
    row = b"\x00" + bytes(rgb) * size
    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(row * size, 9))
        + _chunk(b"IEND", b"")
    )


def png_data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)
