"""Screening: the cheap per-row checks of encoded bytes in Python, before the TensorFlow graph.

Screening (``screen_batch``) is the cheap Python step before the traced graph: it reads only image
headers, refuses rows that are null, empty, too large, not an image, truncated, or that declare an
absurd pixel count (a decompression bomb), and reads the EXIF orientation (phone photos).

One rule decides what the graph decodes: the graph decodes what TensorFlow decodes exactly as Pillow
does (8-bit and 16-bit PNG of every colour type but APNG, grayscale and RGB JPEG); everything else
(every BMP, GIF, APNG, CMYK/YCCK JPEG, TIFF, WebP, ... that Pillow reads) is decoded once here by
Pillow and handed to the graph as a lossless PNG, turned upright. Conversion follows Pillow's
``convert("RGB")`` with two conventions, the same for every format:

- transparency is dropped: every pixel keeps its stored colour (a transparent palette entry shows
  its palette colour), which is what TensorFlow's PNG decoder does too;
- 16-bit and 32-bit samples are scaled to 8 bits (``I;16``: / 257; ``I``: by its bit depth; float:
  0..1 scaled to 0..255 when it fits, else clipped), never clipped to white;
- animated GIF and APNG give their first frame, composed on the full canvas.

Pillow's decompression-bomb limit is set from ``ImageLimits.max_pixels`` (a process-wide Pillow
setting: the limits of the latest batch). A JPEG is truncated only when its entropy-coded data ends
before an end-of-image marker; bytes after that marker (motion photos, maker trailers) are dropped
before decoding. Error texts are deterministic and one line (``BMP: unsupported compression 3``).

Decoder warnings never reach the console: Pillow's Python warnings are recorded, and while Pillow
decodes a TIFF, libtiff's messages (written by C code to file descriptor 2) go to a temporary file
under a process lock; they are counted per row (``Screened.warnings``), and any other line caught in
that window (another thread's) is written back to stderr afterwards.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

_PNG_IEND = b"IEND\xaeB`\x82"
_JPEG_MARKER = re.compile(rb"\xff+([^\x00\xff])")  # a marker, after any fill bytes
_JPEG_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # the first marker ending entropy-coded data (no
# repeat: ``\xff+`` would backtrack at every stuffed FF00, 20x slower; fill bytes are matched after it)
_JPEG_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM, RST0..7: no length
_JPEG_NATIVE_MODES = {"L", "RGB"}  # CMYK/YCCK JPEGs go through Pillow (Adobe inversion)
_LIBTIFF_LINE = re.compile(rb"^[^\s:]+: .*$")  # libtiff's default handlers: "module: message."


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
    def of(cls, *, max_bytes: int | str | None = None, max_pixels: int | str | None = None) -> ImageLimits:
        """The default limits with those given (None: the default; ``"24 MiB"``, ``"64M"`` as ``parse_size``
        reads them); UserError, naming the option (``max_image_bytes``, ``max_pixels``), for a limit below 1."""
        from image_transfer.errors import UserError

        changes = {}
        for name, option, value, binary in (
            ("max_bytes", "max_image_bytes", max_bytes, True),
            ("max_pixels", "max_pixels", max_pixels, False),
        ):
            if value is None:
                continue
            number = parse_size(value, binary=binary, option=option)
            if number < 1:
                raise UserError(f"{option} must be at least 1, got {value}")
            changes[name] = number
        return cls.default().replace(**changes)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)


def parse_size(value: int | str, *, binary: bool = True, option: str = "size") -> int:
    """An int, or a number with a unit: ``24MiB``, ``24 MiB``, ``24MB``, ``24M`` (bytes: ``binary`` reads
    K/M/G/T and KiB/MiB... as powers of 1024, KB/MB... as powers of 1000; counts: ``64M`` is 64,000,000).

    UserError naming ``option`` for anything else.
    """
    from image_transfer.errors import UserError

    if isinstance(value, bool):
        raise UserError(f"{option} must be a number, got {value!r}")
    if isinstance(value, int):
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise UserError(f"{option} must be a number, optionally with a unit (24MiB, 24 MB, 64M), got {value!r}")
    number, prefix, i, b = match.groups()
    power = "kmgt".find(prefix.lower()) + 1 if prefix else 0
    if i and not prefix or (b and not binary):
        raise UserError(f"{option}: {value!r} is not a unit it takes")
    base = 1024 if binary and (i or not b) else 1000
    return int(round(float(number) * base**power))


@dataclass(frozen=True)
class Screened:
    """The outcome of screening one batch: bytes for the graph, and an error per refused row."""

    payloads: list[bytes]  # images to decode, in row order of ``kept``
    kept: list[int]  # row positions of ``payloads``
    errors: list[str | None]  # per input row: None when kept
    orientations: list[int]  # EXIF orientation (1..8) of each payload; 1 = as stored
    warnings: list[int] | None = None  # per input row: decoder warnings silenced while screening it


def _sniff(data: bytes) -> str | None:
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:2] == b"BM":
        return "BMP"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def jpeg_end(data: bytes) -> int | None:
    """The length of a JPEG up to and including its end-of-image marker; None when the data ends first.

    Segments are skipped by their lengths and entropy-coded data up to the next marker, so an EOI inside
    an EXIF thumbnail does not count, and whatever follows the image's own EOI is not part of it.
    """
    i, n = 2, len(data)
    while i < n:
        marker = _JPEG_MARKER.match(data, i)
        if marker is None:  # stray bytes between segments (decoders skip them): resync on the next marker
            found = _JPEG_SCAN_END.search(data, i)
            if found is None:
                return None
            i = found.start()
            continue
        code, i = marker.group(1)[0], marker.end()
        if code == 0xD9:
            return i
        if code in _JPEG_STANDALONE:
            continue
        if i + 2 > n:
            return None
        i += int.from_bytes(data[i : i + 2], "big")
        if i > n:
            return None
        if code == 0xDA:  # start of scan: entropy-coded data up to the next marker (RSTn are inside it)
            found = _JPEG_SCAN_END.search(data, i)
            if found is None:
                return None
            i = found.start()
    return None


_EXIF_ORIENTATION = 0x0112


def exif_orientation(img: Any) -> int:
    """The EXIF orientation (1..8) of an opened Pillow image; 1 when absent or invalid."""
    try:
        value = int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a malformed EXIF block is not worth refusing the image
        return 1
    return value if 1 <= value <= 8 else 1


# ---- quiet, deterministic Pillow ------------------------------------------------------------------

_STDERR_LOCK = threading.Lock()


class _Quiet:
    """Counts the decoder warnings silenced inside ``pillow()`` (Python warnings, libtiff's lines)."""

    def __init__(self, max_pixels: int | None) -> None:
        self.max_pixels = max_pixels
        self.count = 0

    @contextlib.contextmanager
    def pillow(self) -> Iterator[None]:
        """Pillow with its bomb limit from ``max_pixels`` and its warnings recorded, not shown."""
        from PIL import Image

        if self.max_pixels is not None:  # over it: a warning (recorded here), over twice: an error
            Image.MAX_IMAGE_PIXELS = self.max_pixels
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                yield
            finally:
                self.count += sum(1 for w in caught if not issubclass(w.category, Image.DecompressionBombWarning))

    @contextlib.contextmanager
    def stderr(self) -> Iterator[None]:
        """File descriptor 2 caught for the block (libtiff writes there from C); other lines go back."""
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError, AttributeError):  # no descriptor 2 here: nothing to keep quiet
            yield
            return
        with _STDERR_LOCK, tempfile.TemporaryFile() as caught:
            os.dup2(caught.fileno(), 2)
            try:
                yield
            finally:
                with contextlib.suppress(OSError, ValueError):
                    sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
                caught.seek(0)
                for line in caught.read().splitlines():
                    if _LIBTIFF_LINE.match(line):
                        self.count += 1
                    elif line.strip():
                        os.write(2, line + b"\n")


def describe_error(fmt: str | None, exc: BaseException, max_pixels: int | None = None) -> str:
    """One deterministic line for a decoder's exception: ``BMP: unsupported compression 3``.

    No object reprs or addresses (``<_io.BytesIO object at 0x...>``), the format named once.
    """
    from PIL import Image

    name = fmt or "image"
    text = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "") or type(exc).__name__
    if isinstance(exc, Image.DecompressionBombError):
        declared = re.search(r"\((\d+) pixels\)", text)
        size = f"declares {declared.group(1)} pixels" if declared else "has too many pixels"
        limit = f", over the limit of {max_pixels}" if max_pixels else ", over the limit"
        return f"refused before decoding: {name} {size}{limit}"
    if "cannot identify image file" in text:
        return f"{name}: unreadable header" if fmt else "not an image (unrecognised format)"
    if "truncated" in text.lower() or isinstance(exc, EOFError):
        return f"{name}: truncated (the data ends before the image does)"
    code = re.fullmatch(r"(?:decoder error )?(-?\d+)", text)  # Pillow's codec status (e.g. -2: broken data)
    if code:
        return f"{name}: corrupt image data (decoder error {code.group(1)})"
    text = re.sub(r"<[^<>]*\bat 0x[0-9a-fA-F]+>", "the data", text)
    text = re.sub(r"\s*\b0x[0-9a-fA-F]{8,}\b", "", text)
    if fmt:
        text = re.sub(rf"\s*\b{re.escape(fmt)}\b\s*", " ", text, flags=re.IGNORECASE).strip()
    text = re.sub(r"\s*\((\w+)\)", r" \1", text).rstrip(". ")
    text = text[:1].lower() + text[1:]
    return f"{name}: {text[:200] or type(exc).__name__}"


def _bits(img: Any) -> int:
    """The bit depth of an ``I`` image's samples (the TIFF tag when there is one, else from the values)."""
    try:
        tag = img.tag_v2.get(258)
        bits = int(tag[0] if isinstance(tag, tuple) else tag)
        if 8 < bits <= 32:
            return bits
    except Exception:  # noqa: BLE001 - not a TIFF, or no such tag
        pass
    lo, hi = img.getextrema()
    return 16 if hi <= 65535 else 32


def to_rgb(img: Any) -> Any:
    """A loaded Pillow image as 8-bit RGB: ``convert("RGB")``, with deep samples scaled, not clipped."""
    import numpy as np
    from PIL import Image

    mode = img.mode
    if mode == "RGB":
        return img
    if not (mode.startswith("I;16") or mode in ("I", "F")):
        return img.convert("RGB")
    samples = np.asarray(img, dtype=np.float64)
    if mode == "F":
        finite = samples[np.isfinite(samples)]
        fits = finite.size > 0 and finite.min() >= 0.0 and finite.max() <= 1.0
        samples = samples * 255.0 if fits else samples
    elif mode == "I":
        samples = samples * (255.0 / (2 ** _bits(img) - 1))
    else:
        samples = samples / 257.0
    gray = np.clip(np.round(np.nan_to_num(samples)), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


def convert(data: bytes, orientation: int = 1, *, max_pixels: int | None = None) -> tuple[bytes | None, str | None]:
    """Decode with Pillow, turn upright, and return a lossless RGB PNG; or (None, why not).

    ``max_pixels`` sets Pillow's bomb limit (None: as the latest screening set it).
    """
    return _convert(data, orientation, _Quiet(max_pixels), _sniff(data))


def _convert(data: bytes, orientation: int, quiet: _Quiet, sniffed: str | None) -> tuple[bytes | None, str | None]:
    from PIL import Image, ImageOps

    fmt = sniffed
    try:
        with quiet.pillow():
            img = Image.open(io.BytesIO(data))
            fmt = img.format or fmt
            with quiet.stderr() if fmt == "TIFF" else contextlib.nullcontext():
                img.load()
            if orientation != 1:
                img = ImageOps.exif_transpose(img)
            rgb = to_rgb(img)
        out = io.BytesIO()
        rgb.save(out, "PNG", compress_level=1)
        return out.getvalue(), None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a per-row error
        return None, describe_error(fmt, exc, quiet.max_pixels)


# ---- screening -------------------------------------------------------------------------------------


def screen_one(data: Any, limits: ImageLimits, *, upright: bool = False) -> tuple[bytes | None, str | None]:
    """Check one encoded image; returns (bytes to decode, None) or (None, reason it was refused).

    With ``upright``, an image with an EXIF orientation is returned re-encoded (PNG) the right way up,
    for consumers that decode without orientation (training data); scoring passes the orientation to
    the graph instead (``screen_batch``).
    """
    quiet = _Quiet(limits.max_pixels)
    payload, error, orientation = _screen(data, limits, quiet)
    if payload is None or not upright or orientation == 1:
        return payload, error
    return _convert(payload, orientation, quiet, _sniff(payload))


def _native(sniffed: str | None, img: Any, data: bytes) -> tuple[bool, bytes | str]:
    """(True, the bytes the graph decodes) for an image TensorFlow decodes as Pillow does, else
    (False, "") to convert it (a PNG without its IEND chunk too), or (True, error) for a JPEG visibly cut
    short."""
    if sniffed == "JPEG" and img.mode in _JPEG_NATIVE_MODES:
        end = jpeg_end(data)
        if end is None:
            return True, "JPEG: truncated (the entropy-coded data ends before the end-of-image marker)"
        return True, data[:end]
    if sniffed == "PNG" and not _animated_png(data):
        end = data.rfind(_PNG_IEND)
        if end < 0:  # cut before IEND: Pillow decides (every pixel there: scored from them; else its error)
            return False, b""
        return True, data[: end + len(_PNG_IEND)]
    return False, b""


def _animated_png(data: bytes) -> bool:
    """Whether a PNG is an APNG (an ``acTL`` chunk before its first ``IDAT``)."""
    idat = data.find(b"IDAT")
    return b"acTL" in data[: idat if idat >= 0 else len(data)]


def _screen(data: Any, limits: ImageLimits, quiet: _Quiet) -> tuple[bytes | None, str | None, int]:
    """(bytes for the graph or None, error or None, EXIF orientation)."""
    from PIL import Image

    if data is None:
        return None, "null image", 1
    data = bytes(data)
    if not data:
        return None, "empty image", 1
    if len(data) > limits.max_bytes:
        return None, f"encoded size {len(data)} bytes exceeds the limit of {limits.max_bytes}", 1
    sniffed = _sniff(data)
    try:
        with quiet.pillow():
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            fmt = img.format or sniffed or "image"
    except Exception as exc:  # noqa: BLE001 - any header failure is a per-row error
        return None, describe_error(sniffed, exc, limits.max_pixels), 1
    fmt = sniffed if fmt in ("MPO",) else fmt
    if width <= 0 or height <= 0:
        return None, f"{fmt}: declares an empty size {width}x{height}", 1
    if width * height > limits.max_pixels:
        message = (
            f"refused before decoding: {fmt} declares {width}x{height} = {width * height} pixels, "
            f"over the limit of {limits.max_pixels}"
        )
        return None, message, 1
    orientation = exif_orientation(img)
    native, outcome = _native(sniffed, img, data)
    if native:
        if isinstance(outcome, str):
            return None, outcome, 1
        return outcome, None, orientation
    # Decoded once with Pillow, handed to the graph as a lossless PNG (upright: orientation 1).
    payload, error = _convert(data, orientation, quiet, sniffed)
    return payload, error, 1


def screen_batch(values: Sequence[Any], limits: ImageLimits) -> Screened:
    """Screen a batch of encoded images (``bytes``, ``bytearray``, ``memoryview`` or None)."""
    payloads: list[bytes] = []
    kept: list[int] = []
    errors: list[str | None] = []
    orientations: list[int] = []
    silenced: list[int] = []
    for i, value in enumerate(values):
        quiet = _Quiet(limits.max_pixels)
        data, error, orientation = _screen(value, limits, quiet)
        errors.append(error)
        silenced.append(quiet.count)
        if data is not None:
            payloads.append(data)
            kept.append(i)
            orientations.append(orientation)
    return Screened(payloads=payloads, kept=kept, errors=errors, orientations=orientations, warnings=silenced)
