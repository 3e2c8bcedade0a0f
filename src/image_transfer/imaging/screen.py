"""Screening: the cheap per-row checks of encoded bytes in Python, before the TensorFlow graph.

Screening (``screen_batch``) is the cheap Python step before the traced graph: it reads only image
headers, refuses rows that are null, empty, too large, not an image, truncated, or that declare an
absurd pixel count (a decompression bomb), reads the EXIF orientation (phone photos), and re-encodes
the rare formats TensorFlow cannot decode (WebP, TIFF, ...) losslessly to PNG. Everything else goes to
``decode_resize`` inside the graph, which applies the orientation before an antialiased resize.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

# Formats TensorFlow's decode_image reads itself (first frame of an animated GIF).
_TF_NATIVE = {"JPEG", "PNG", "GIF", "BMP"}
_PNG_IEND = b"IEND\xaeB`\x82"


@dataclass(frozen=True)
class ImageLimits:
    """Per-image limits, applied from the encoded size and the header before anything is decoded."""

    max_bytes: int = 24 * 1024 * 1024  # 64 images per Arrow batch stay under Arrow's 2 GB binary limit
    max_pixels: int = 64_000_000

    @classmethod
    def default(cls) -> ImageLimits:
        """Limits that admit 50-megapixel photos and refuse decompression bombs."""
        return cls()

    def replace(self, **changes: int) -> ImageLimits:
        """A copy with some limits changed."""
        if any(v <= 0 for v in changes.values()):
            raise ValueError(f"image limits must be positive: {changes}")
        return replace(self, **changes)

    @classmethod
    def of(cls, *, max_bytes: int | None = None, max_pixels: int | None = None) -> ImageLimits:
        """The default limits with those given (None: the default); UserError for a limit below 1."""
        from image_transfer.errors import UserError

        changes = {k: v for k, v in (("max_bytes", max_bytes), ("max_pixels", max_pixels)) if v is not None}
        try:
            return cls.default().replace(**changes)
        except ValueError as exc:
            raise UserError(str(exc)) from exc


@dataclass(frozen=True)
class Screened:
    """The outcome of screening one batch: bytes for the graph, and an error per refused row."""

    payloads: list[bytes]  # images to decode, in row order of ``kept``
    kept: list[int]  # row positions of ``payloads``
    errors: list[str | None]  # per input row: None when kept
    orientations: list[int]  # EXIF orientation (1..8) of each payload; 1 = as stored


def _sniff(data: bytes) -> str | None:
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:2] == b"BM":
        return "BMP"
    return None


def _truncated(fmt: str, data: bytes) -> bool:
    """Whether a TF-native image visibly lacks its end (TensorFlow decodes some truncated PNGs silently)."""
    if fmt == "PNG":
        return _PNG_IEND not in data[-64:]
    if fmt == "JPEG":
        return b"\xff\xd9" not in data[-4096:]
    if fmt == "GIF":
        return not data.rstrip(b"\x00").endswith(b";")
    if fmt == "BMP":
        declared = int.from_bytes(data[2:6], "little")
        return declared > len(data)
    return False


_EXIF_ORIENTATION = 0x0112


def exif_orientation(img: Any) -> int:
    """The EXIF orientation (1..8) of an opened Pillow image; 1 when absent or invalid."""
    try:
        value = int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a malformed EXIF block is not worth refusing the image
        return 1
    return value if 1 <= value <= 8 else 1


def screen_one(data: Any, limits: ImageLimits, *, upright: bool = False) -> tuple[bytes | None, str | None]:
    """Check one encoded image; returns (bytes to decode, None) or (None, reason it was refused).

    With ``upright``, an image with an EXIF orientation is returned re-encoded (PNG) the right way up,
    for consumers that decode without orientation (training data); scoring passes the orientation to
    the graph instead (``screen_batch``).
    """
    payload, error, orientation = _screen(data, limits)
    if payload is None or not upright or orientation == 1:
        return payload, error
    return _reencode(payload, orientation)


def _reencode(data: bytes, orientation: int = 1) -> tuple[bytes | None, str | None]:
    """Decode with Pillow, turn upright, and return a lossless RGB PNG."""
    from PIL import Image, ImageOps

    fmt = "image"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            fmt = img.format or fmt
            img.load()
            if orientation != 1:
                img = ImageOps.exif_transpose(img)
            rgb = img.convert("RGB")
        out = io.BytesIO()
        rgb.save(out, "PNG", compress_level=1)
        return out.getvalue(), None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a per-row error
        return None, f"could not decode {fmt}: {exc}"


def _screen(data: Any, limits: ImageLimits) -> tuple[bytes | None, str | None, int]:
    """(bytes for the graph or None, error or None, EXIF orientation)."""
    from PIL import Image, UnidentifiedImageError

    if data is None:
        return None, "null image", 1
    data = bytes(data)
    if not data:
        return None, "empty image", 1
    if len(data) > limits.max_bytes:
        return None, f"encoded size {len(data)} bytes exceeds the limit of {limits.max_bytes}", 1
    sniffed = _sniff(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            fmt = img.format or sniffed or "unknown"
    except Image.DecompressionBombError as exc:
        return None, f"refused before decoding: {exc}", 1
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        if sniffed is None:
            return None, "not an image (unrecognised format)", 1
        return None, f"unreadable {sniffed} header ({exc})", 1
    if width <= 0 or height <= 0:
        return None, f"{fmt} declares an empty size {width}x{height}", 1
    if width * height > limits.max_pixels:
        message = (
            f"refused before decoding: {fmt} declares {width}x{height} = {width * height} pixels, "
            f"over the limit of {limits.max_pixels}"
        )
        return None, message, 1
    orientation = exif_orientation(img)
    if sniffed in _TF_NATIVE:
        if _truncated(sniffed, data):
            return None, f"truncated {sniffed} (no end marker)", 1
        return data, None, orientation
    # A format the graph cannot decode: decode once with Pillow and hand the graph a lossless PNG
    # (turned upright here, so the graph gets orientation 1).
    payload, error = _reencode(data, orientation)
    return payload, error, 1


def screen_batch(values: Sequence[Any], limits: ImageLimits) -> Screened:
    """Screen a batch of encoded images (``bytes``, ``bytearray``, ``memoryview`` or None)."""
    payloads: list[bytes] = []
    kept: list[int] = []
    errors: list[str | None] = []
    orientations: list[int] = []
    for i, value in enumerate(values):
        data, error, orientation = _screen(value, limits)
        errors.append(error)
        if data is not None:
            payloads.append(data)
            kept.append(i)
            orientations.append(orientation)
    return Screened(payloads=payloads, kept=kept, errors=errors, orientations=orientations)
