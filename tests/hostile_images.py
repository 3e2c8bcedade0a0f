"""A corpus of hostile and unusual images, generated (never downloaded), deterministic.

    uv run python tests/hostile_images.py OUT_DIR      # writes the corpus as files

``corpus()`` maps a file name to (bytes, whether it should score). The names carry the extension a
user's folder would have (some deliberately wrong).
"""

from __future__ import annotations

import io
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _picture(w: int = 80, h: int = 60, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1)
    noise = rng.integers(-10, 11, (h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _encode(img: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **options)
    return out.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A small, valid-looking PNG whose header declares ``width`` x ``height`` RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    # Rows of zeros compress ~1000:1; a few rows are enough to look real without being huge here.
    idat = zlib.compress(b"\x00" * (width * 3 + 1) * 4, 9)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def jpeg_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A small JPEG whose frame header (SOF) is patched to declare ``width`` x ``height``."""
    data = bytearray(_encode(_picture(16, 16), "JPEG"))
    i = 2
    while i < len(data):
        marker = data[i + 1]
        length = struct.unpack(">H", data[i + 2 : i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            data[i + 5 : i + 9] = struct.pack(">HH", height, width)
            return bytes(data)
        i += 2 + length
    raise AssertionError("no SOF marker found")


def animated_gif() -> bytes:
    frames = [_picture(seed=s).convert("P") for s in range(3)]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def corpus() -> dict[str, tuple[bytes, bool]]:
    """File name -> (bytes, should score). ``False`` rows must come back with an error, not a crash."""
    pic = _picture()
    jpeg = _encode(pic, "JPEG", quality=90)
    png = _encode(pic, "PNG")
    sixteen = Image.fromarray((np.asarray(pic.convert("L"), dtype=np.uint16) * 257).astype(np.uint16))
    return {
        "good.jpg": (jpeg, True),
        "good.png": (png, True),
        "grayscale.jpg": (_encode(pic.convert("L"), "JPEG"), True),
        "rgba.png": (_encode(pic.convert("RGBA"), "PNG"), True),
        "palette.png": (_encode(pic.convert("P"), "PNG"), True),
        "sixteen_bit.png": (_encode(sixteen, "PNG"), True),
        "cmyk.jpg": (_encode(pic.convert("CMYK"), "JPEG"), True),
        "animated.gif": (animated_gif(), True),
        "bitmap.bmp": (_encode(pic, "BMP"), True),
        "progressive.jpg": (_encode(pic, "JPEG", progressive=True), True),
        "one_pixel.png": (_encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), True),
        "large_4000x3000.jpg": (_encode(_picture(4000, 3000), "JPEG", quality=70), True),
        "png_named.jpg": (png, True),
        "name with spaces.png": (png, True),
        "webp_image.webp": (_encode(pic, "WEBP"), True),
        "tiff_image.tif": (_encode(pic, "TIFF"), True),
        "empty.jpg": (b"", False),
        "empty with spaces.jpg": (b"", False),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], False),
        "truncated.png": (png[: len(png) // 2], False),
        "html_named.jpg": (b"<!doctype html><html><body>not an image</body></html>", False),
        "text.png": (b"just some text\n" * 20, False),
        "zeros.jpg": (b"\x00" * 2048, False),
        "bomb.png": (png_bomb(), False),
        "bomb.jpg": (jpeg_bomb(), False),
    }


def write_corpus(folder: Path) -> dict[str, bool]:
    """Write the corpus into ``folder``; returns file name -> should score."""
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}
    for name, (data, ok) in corpus().items():
        (folder / name).write_bytes(data)
        expected[name] = ok
    return expected


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "hostile")
    for name, ok in write_corpus(target).items():
        print(f"{'ok ' if ok else 'bad'} {target / name}")
