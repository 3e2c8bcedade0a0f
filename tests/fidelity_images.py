"""Images in every variant the fidelity tests compare, made here (never downloaded), deterministic.

``variants()`` maps a name to (encoded bytes, the pixels Pillow sees as uint8 RGB [h, w, 3]). The
reference is Pillow's ``convert("RGB")`` (transparency dropped: stored colours), except for deep
images, whose reference is the generated samples scaled to 8 bits.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

W, H = 40, 30


def picture(w: int = W, h: int = H) -> Image.Image:
    """A smooth RGB picture with some texture (every channel different)."""
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x * 7 + y * 13) % 256], -1)
    return Image.fromarray(rgb.astype(np.uint8))


def encode(img: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **options)
    return out.getvalue()


def pillow_rgb(data: bytes) -> np.ndarray:
    """What Pillow sees, by the documented convention (upright, ``convert("RGB")``)."""
    from PIL import ImageOps

    img = Image.open(io.BytesIO(data))
    img.load()
    return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))


# ---- BMP, every header, depth and compression, written by hand -----------------------------------


def _bmp(header: bytes, palette: bytes, pixels: bytes, *, masks: bytes = b"") -> bytes:
    offset = 14 + len(header) + len(masks) + len(palette)
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + header + masks + palette + pixels


def _info(w: int, h: int, bpp: int, compression: int = 0, colors: int = 0, size: int = 40) -> bytes:
    base = struct.pack("<IiiHHIIiiII", size, w, h, 1, bpp, compression, 0, 2835, 2835, colors, 0)
    return base + b"\x00" * (size - 40)


def _rows(rows: list[bytes]) -> bytes:
    """Bottom-up rows, each padded to 4 bytes."""
    return b"".join(r + b"\x00" * (-len(r) % 4) for r in reversed(rows))


def _indexed(bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices [H, W] < 2**bits and a palette [2**bits, 3]."""
    n = 2**bits
    y, x = np.mgrid[0:H, 0:W]
    index = ((x // 3 + y // 2) % n).astype(np.uint8)
    palette = np.stack(
        [np.arange(n) * 255 // max(n - 1, 1), (np.arange(n) * 97) % 256, 255 - np.arange(n) * 255 // n], -1
    )
    return index, palette.astype(np.uint8)


def _bgr0(palette: np.ndarray, size: int = 4) -> bytes:
    return b"".join(bytes([b, g, r, 0][:size]) for r, g, b in palette)


def _pack(row: np.ndarray, bits: int) -> bytes:
    if bits == 8:
        return row.tobytes()
    per = 8 // bits
    out = bytearray()
    for i in range(0, len(row), per):
        byte = 0
        for j, v in enumerate(row[i : i + per]):
            byte |= int(v) << (8 - bits * (j + 1))
        out.append(byte)
    return bytes(out)


def bmp_indexed(bits: int) -> tuple[bytes, np.ndarray]:
    index, palette = _indexed(bits)
    rows = [_pack(r, bits) for r in index]
    return _bmp(_info(W, H, bits, colors=len(palette)), _bgr0(palette), _rows(rows)), palette[index]


def bmp_rle(bits: int) -> tuple[bytes, np.ndarray]:
    """RLE8 (compression 1) or RLE4 (compression 2): runs of equal indices, an end of line per row."""
    index, palette = _indexed(bits)
    data = bytearray()
    for row in index[::-1]:
        i = 0
        while i < W:
            j = i
            limit = 255 if bits == 8 else 254
            while j < W and row[j] == row[i] and j - i < limit:
                j += 1
            value = int(row[i]) if bits == 8 else (int(row[i]) << 4) | int(row[i])
            data += bytes([j - i, value])
            i = j
        data += b"\x00\x00"
    data += b"\x00\x01"
    compression = 1 if bits == 8 else 2
    return _bmp(_info(W, H, bits, compression, colors=len(palette)), _bgr0(palette), bytes(data)), palette[index]


def bmp_os2(bits: int = 24) -> tuple[bytes, np.ndarray]:
    """An OS/2 1.x bitmap (12-byte core header): 24-bit, or 8-bit with a 3-byte palette."""
    if bits == 24:
        rgb = np.asarray(picture())
        header = struct.pack("<IHHHH", 12, W, H, 1, 24)
        return _bmp(header, b"", _rows([r[:, ::-1].tobytes() for r in rgb])), rgb
    index, palette = _indexed(8)
    header = struct.pack("<IHHHH", 12, W, H, 1, 8)
    return _bmp(header, _bgr0(palette, 3), _rows([r.tobytes() for r in index])), palette[index]


def bmp_16(five_six_five: bool) -> tuple[bytes, np.ndarray]:
    """16-bit: 555 (BI_RGB) or 565 (BI_BITFIELDS with its masks)."""
    rgb = np.asarray(picture()).astype(np.uint32)
    if five_six_five:
        r, g, b = rgb[..., 0] >> 3, rgb[..., 1] >> 2, rgb[..., 2] >> 3
        words = (r << 11) | (g << 5) | b
        seen = np.stack([r * 255 // 31, g * 255 // 63, b * 255 // 31], -1)
        masks, compression = struct.pack("<III", 0xF800, 0x07E0, 0x001F), 3
    else:
        r, g, b = rgb[..., 0] >> 3, rgb[..., 1] >> 3, rgb[..., 2] >> 3
        words = (r << 10) | (g << 5) | b
        seen = np.stack([r * 255 // 31, g * 255 // 31, b * 255 // 31], -1)
        masks, compression = b"", 0
    rows = [w.astype("<u2").tobytes() for w in words]
    return _bmp(_info(W, H, 16, compression), b"", _rows(rows), masks=masks), seen.astype(np.uint8)


def bmp_32_bitfields(alpha: bool, order: str = "BGRA") -> tuple[bytes, np.ndarray]:
    """32-bit BI_BITFIELDS with the channel order of ``order`` (low byte first), alpha or padding."""
    rgb = np.asarray(picture())
    a = (np.arange(W * H).reshape(H, W) % 256).astype(np.uint8)
    planes = {"R": rgb[..., 0], "G": rgb[..., 1], "B": rgb[..., 2], "A": a if alpha else np.zeros_like(a)}
    pixels = np.stack([planes[c] for c in order], -1)
    mask = {c: 0xFF << (8 * i) for i, c in enumerate(order)}
    masks = struct.pack("<III", mask["R"], mask["G"], mask["B"])
    if alpha:  # a V4 header carries the alpha mask
        header = bytearray(_info(W, H, 32, 3, size=108))
        header[40:56] = struct.pack("<IIII", mask["R"], mask["G"], mask["B"], mask["A"])
        header[56:60] = b"BGRs"
        return _bmp(bytes(header), b"", _rows([r.tobytes() for r in pixels])), rgb
    return _bmp(_info(W, H, 32, 3), b"", _rows([r.tobytes() for r in pixels]), masks=masks), rgb


# ---- GIF -------------------------------------------------------------------------------------------


def _gif_blocks(data: bytes) -> tuple[int, int]:
    """(end of the global colour table, position of the first image descriptor)."""
    flags = data[10]
    gct = 13 + (3 * 2 ** ((flags & 7) + 1) if flags & 0x80 else 0)
    i = gct
    while data[i] == 0x21:  # extensions: label, then sub-blocks up to a zero length
        i += 2
        while data[i]:
            i += data[i] + 1
        i += 1
    assert data[i] == 0x2C, "no image descriptor"
    return gct, i


def gif_offset_frame(canvas: tuple[int, int] = (75, 50), at: tuple[int, int] = (25, 0)) -> bytes:
    """A 50x50 first frame placed at ``at`` on a larger logical screen."""
    frame = picture(50, 50).quantize(32)
    data = bytearray(encode(frame, "GIF"))
    data[6:10] = struct.pack("<HH", *canvas)
    _, desc = _gif_blocks(bytes(data))
    data[desc + 1 : desc + 5] = struct.pack("<HH", *at)
    return bytes(data)


def gif_local_palette_only() -> bytes:
    """A GIF without a global colour table: the palette moves into the image descriptor."""
    data = encode(picture().quantize(64), "GIF")
    gct, desc = _gif_blocks(data)
    flags = data[10]
    table = data[13:gct]
    lsd = data[:10] + bytes([flags & 0x70]) + data[11:13]
    descriptor = data[desc : desc + 9] + bytes([0x80 | (data[desc + 9] & 0x40) | (flags & 7)])
    return lsd + data[gct:desc] + descriptor + table + data[desc + 10 :]


def gif_empty_comment() -> bytes:
    """A comment extension whose first sub-block is empty (21 FE 00)."""
    data = encode(picture().quantize(64), "GIF")
    gct, _ = _gif_blocks(data)
    return data[:gct] + b"\x21\xfe\x00" + data[gct:]


# ---- PNG, JPEG, TIFF -------------------------------------------------------------------------------


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    i, chunks = 8, []
    while i < len(data):
        (n,) = struct.unpack(">I", data[i : i + 4])
        chunks.append((data[i + 4 : i + 8], data[i + 8 : i + 8 + n]))
        i += 12 + n
    return chunks


def _png(chunks: list[tuple[bytes, bytes]], bad_crc: bytes = b"") -> bytes:
    out = b"\x89PNG\r\n\x1a\n"
    for kind, body in chunks:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        out += struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc ^ (1 if kind == bad_crc else 0))
    return out


def png_bad_crc(kind: bytes = b"IDAT") -> bytes:
    return _png(_png_chunks(encode(picture(), "PNG")), bad_crc=kind)


def png_bad_adler() -> bytes:
    """The zlib stream's Adler-32 checksum is wrong (the pixels are fine)."""
    chunks = _png_chunks(encode(picture(), "PNG"))
    fixed: list[tuple[bytes, bytes]] = []
    for kind, body in chunks:  # the checksum in an IDAT of its own, after every row (Pillow stops there)
        fixed += [(kind, body[:-4]), (kind, body[-4:-1] + bytes([body[-1] ^ 1]))] if kind == b"IDAT" else [(kind, body)]
    return _png(fixed)


def jpeg_with_trailer() -> bytes:
    """A JPEG followed by what phones append: a motion-photo video and a second, maker JPEG."""
    main = encode(picture(), "JPEG", quality=95)
    video = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8
    return main + video + encode(picture(16, 16), "JPEG") + b"\xff\xd8 trailing junk"


def jpeg_ycck() -> bytes:
    """A CMYK JPEG whose Adobe marker says YCCK (transform 2)."""
    data = bytearray(encode(picture().convert("CMYK"), "JPEG", quality=95))
    at = data.find(b"Adobe")
    assert at > 0
    data[at + 11] = 2
    return bytes(data)


def deep_gray(bits: int) -> np.ndarray:
    y, x = np.mgrid[0:H, 0:W]
    top = 2**bits - 1
    return (x * top // (W - 1) // 2 + y * top // (H - 1) // 2).astype(np.uint16 if bits == 16 else np.int32)


def _gray3(values: np.ndarray) -> np.ndarray:
    return np.repeat(np.clip(np.round(values), 0, 255).astype(np.uint8)[..., None], 3, -1)


def variants() -> dict[str, tuple[bytes, np.ndarray]]:
    """Name -> (bytes, the uint8 RGB pixels Pillow sees, or what deep samples scale to)."""
    pic = picture()
    out: dict[str, tuple[bytes, np.ndarray | None]] = {}
    for mode in ("1", "L", "P", "RGB", "RGBA"):
        img = pic.convert(mode) if mode != "P" else pic.quantize(100)
        out[f"bmp_pillow_{mode}"] = (encode(img, "BMP"), None)
    for bits in (1, 4, 8):
        out[f"bmp_indexed_{bits}"] = bmp_indexed(bits)
    out["bmp_rle8"] = bmp_rle(8)
    out["bmp_rle4"] = bmp_rle(4)
    out["bmp_os2_24"] = bmp_os2(24)
    out["bmp_os2_8"] = bmp_os2(8)
    out["bmp_16_555"] = bmp_16(False)
    out["bmp_16_565"] = bmp_16(True)
    out["bmp_32_bgrx"] = bmp_32_bitfields(False, "BGRA")
    out["bmp_32_bgra"] = bmp_32_bitfields(True, "BGRA")
    out["bmp_32_argb"] = bmp_32_bitfields(True, "ABGR")
    sixteen = deep_gray(16)
    out["tiff_16bit_gray"] = (encode(Image.fromarray(sixteen), "TIFF"), _gray3(sixteen / 257))
    out["tiff_16bit_gray_lzw"] = (
        encode(Image.fromarray(sixteen), "TIFF", compression="tiff_lzw"),
        _gray3(sixteen / 257),
    )
    thirty_two = deep_gray(31).astype(np.int32)
    out["tiff_32bit_int"] = (
        encode(Image.fromarray(thirty_two, "I"), "TIFF"),
        _gray3(thirty_two.astype(np.float64) * 255 / (2**32 - 1)),
    )
    unit = (deep_gray(16) / 65535).astype(np.float32)
    out["tiff_float"] = (encode(Image.fromarray(unit, "F"), "TIFF"), _gray3(unit * 255))
    out["tiff_rgb_deflate"] = (encode(pic, "TIFF", compression="tiff_adobe_deflate"), None)
    out["tiff_cmyk"] = (encode(pic.convert("CMYK"), "TIFF"), None)
    out["tiff_palette"] = (encode(pic.quantize(50), "TIFF"), None)
    out["png_16bit_gray"] = (encode(Image.fromarray(sixteen), "PNG"), _gray3(sixteen / 257))
    out["png_palette_transparency"] = (encode(pic.quantize(60), "PNG", transparency=5), None)
    out["png_rgba"] = (encode(pic.convert("RGBA"), "PNG"), None)
    out["png_la"] = (encode(pic.convert("LA"), "PNG"), None)
    out["png_bad_crc_idat"] = (png_bad_crc(b"IDAT"), np.asarray(pic))
    out["png_bad_adler"] = (png_bad_adler(), np.asarray(pic))
    frames = [picture().quantize(64), Image.new("RGB", (W, H), (250, 0, 0)).quantize(4)]
    out["apng_first_frame"] = (encode(frames[0], "PNG", save_all=True, append_images=frames[1:]), None)
    out["gif"] = (encode(pic.quantize(64), "GIF"), None)
    out["gif_transparency"] = (encode(pic.quantize(64), "GIF", transparency=3), None)
    out["gif_animated"] = (encode(frames[0], "GIF", save_all=True, append_images=frames[1:]), None)
    out["gif_offset_frame"] = (gif_offset_frame(), None)
    out["gif_local_palette_only"] = (gif_local_palette_only(), None)
    out["gif_empty_comment"] = (gif_empty_comment(), None)
    out["jpeg"] = (encode(pic, "JPEG", quality=95), None)
    out["jpeg_gray"] = (encode(pic.convert("L"), "JPEG", quality=95), None)
    out["jpeg_progressive"] = (encode(pic, "JPEG", quality=95, progressive=True), None)
    out["jpeg_trailer"] = (jpeg_with_trailer(), None)
    out["jpeg_cmyk"] = (encode(pic.convert("CMYK"), "JPEG", quality=95), None)
    out["jpeg_ycck"] = (jpeg_ycck(), None)
    out["webp_lossless_alpha"] = (encode(pic.convert("RGBA"), "WEBP", lossless=True), None)
    return {k: (data, pillow_rgb(data) if ref is None else ref) for k, (data, ref) in out.items()}


def noisy_tiff() -> bytes:
    """An LZW TIFF whose strip is corrupt: libtiff reports it on file descriptor 2 while Pillow decodes."""
    data = encode(picture(), "TIFF", compression="tiff_lzw")
    img = Image.open(io.BytesIO(data))
    start, length = img.tag_v2[273][0], img.tag_v2[279][0]
    broken = bytearray(data)
    for i in range(start + 8, start + length - 2, 7):
        broken[i] ^= 0x55
    return bytes(broken)
