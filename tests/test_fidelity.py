"""Every image Pillow reads reaches the model as the pixels Pillow sees (issue: image fidelity).

The pixel comparisons run no Spark: each variant is screened as the worker screens it, decoded and
resized by the graph op the worker traces (``decode_resize``), and compared with Pillow's pixels
resized the same way (mean absolute difference at most 2/255).
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import fidelity_images as fi  # noqa: E402

from image_transfer.imaging.screen import ImageLimits, convert, jpeg_end, screen_batch  # noqa: E402

CONNECT = __import__("os").environ.get("IMAGE_TRANSFER_TEST_SESSION") == "connect"

SIZE = (24, 32)  # the model's (height, width): every variant is resized, as for scoring
VARIANTS = fi.variants()


def graph_pixels(data: bytes) -> tuple[np.ndarray, tuple[int, ...]]:
    """(the resized float pixels the model gets, the decoded image's shape) for one encoded image."""
    import tensorflow as tf

    from image_transfer.imaging.graph import decode_resize

    screened = screen_batch([data], ImageLimits.default())
    assert screened.errors == [None], screened.errors
    payload, orientation = screened.payloads[0], screened.orientations[0]
    try:
        decoded = tf.io.decode_image(payload, channels=3, expand_animations=False)
    except tf.errors.InvalidArgumentError:  # what the worker does for a payload the graph refuses
        payload, error = convert(payload, orientation)
        assert error is None, error
        orientation = 1
        decoded = tf.io.decode_image(payload, channels=3, expand_animations=False)
    resized = decode_resize(tf.constant(payload), *SIZE, tf.constant(orientation))
    return resized.numpy(), tuple(decoded.shape)


def resized(rgb: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    return tf.image.resize(rgb.astype(np.float32), SIZE, method="bilinear", antialias=True).numpy()


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_graph_sees_the_pixels_pillow_sees(name):
    data, reference = VARIANTS[name]
    pixels, shape = graph_pixels(data)
    assert shape == reference.shape  # the full canvas (a GIF's logical screen), not a frame's size
    difference = np.abs(pixels - resized(reference)).mean()
    assert difference <= 2.0, f"{name}: mean absolute difference {difference:.2f}/255"


def test_deep_images_are_scaled_not_clipped():
    for name in ("tiff_16bit_gray", "tiff_16bit_gray_lzw", "png_16bit_gray", "tiff_32bit_int", "tiff_float"):
        pixels, _ = graph_pixels(VARIANTS[name][0])
        assert 60 < pixels.mean() < 200, name  # a gradient, not solid white
        assert pixels.std() > 20, name


def test_a_jpeg_ends_at_its_end_of_image_marker_whatever_follows():
    trailer = VARIANTS["jpeg_trailer"][0]
    plain = fi.encode(fi.picture(), "JPEG", quality=95)
    assert jpeg_end(trailer) == len(plain) and trailer.startswith(plain)
    screened = screen_batch([trailer], ImageLimits.default())
    assert screened.errors == [None] and screened.payloads == [plain]  # the trailer is not decoded
    cut = plain[: len(plain) - 40]  # entropy-coded data cut short
    assert jpeg_end(cut) is None
    assert jpeg_end(plain[:-2]) is None  # no EOI at all
    progressive = VARIANTS["jpeg_progressive"][0]
    assert jpeg_end(progressive + b"junk") == len(progressive)
    assert jpeg_end(progressive[: len(progressive) // 2]) is None  # cut between two scans
    errors = screen_batch([cut, progressive[:200]], ImageLimits.default()).errors
    assert all(e is not None and e.startswith("JPEG: truncated") for e in errors), errors


def test_pillow_decodes_what_tensorflow_refuses():
    import tensorflow as tf

    for data in (fi.png_bad_crc(b"IDAT"),):
        with pytest.raises(tf.errors.InvalidArgumentError):
            tf.io.decode_image(data, channels=3).numpy()
        payload, error = convert(data)  # what the worker falls back to for a payload the graph refused
        assert error is None
        assert np.abs(fi.pillow_rgb(payload).astype(int) - np.asarray(fi.picture())).mean() <= 1


def _refusals() -> dict[str, bytes]:
    good_bmp = fi.encode(fi.picture(), "BMP")
    return {
        "bitfields": fi.bmp_32_bitfields(False, "RGBA")[0],
        "compression": good_bmp[:30] + (9).to_bytes(4, "little") + good_bmp[34:],
        "truncated_bmp": good_bmp[: len(good_bmp) // 2],
        "tiff_cut": VARIANTS["tiff_16bit_gray"][0][:300],
        "not_an_image": b"<html>hello</html>",
        "gif_header_only": VARIANTS["gif"][0][:13],
    }


def test_refusals_are_one_deterministic_line_naming_the_format():
    values = list(_refusals().values())
    first = screen_batch(values, ImageLimits.default()).errors
    second = screen_batch(values, ImageLimits.default()).errors
    assert first == second
    errors = dict(zip(_refusals(), first, strict=True))
    assert all(e is not None and "\n" not in e and "0x" not in e and "object at" not in e for e in first), errors
    assert errors["bitfields"] == "BMP: unsupported bitfields layout"
    assert errors["compression"] == "BMP: unsupported compression 9"
    assert errors["truncated_bmp"].startswith("BMP: truncated"), errors
    assert "end marker" not in errors["truncated_bmp"]
    assert errors["tiff_cut"].startswith("TIFF: "), errors
    assert errors["not_an_image"] == "not an image (unrecognised format)"
    assert errors["gif_header_only"].startswith("GIF: "), errors


def test_pixel_limits_quote_max_pixels_for_every_format():
    small = ImageLimits.default().replace(max_pixels=500)
    big = fi.picture(60, 40)
    values = [fi.encode(big, fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")]
    errors = screen_batch(values, small).errors
    assert all(e is not None and "limit of 500" in e and "178956970" not in e for e in errors), errors
    huge = fi.picture(8, 8)
    wide = fi.encode(huge, "BMP")
    wide = wide[:18] + (40000).to_bytes(4, "little") + (40000).to_bytes(4, "little") + wide[26:]
    (error,) = screen_batch([wide], ImageLimits.default()).errors
    assert error == "refused before decoding: BMP declares 1600000000 pixels, over the limit of 64000000", error


def test_decoder_warnings_are_counted_not_shown(capfd):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning reaching the caller would raise here
        screened = screen_batch([fi.noisy_tiff(), VARIANTS["gif_empty_comment"][0]], ImageLimits.default())
    out, err = capfd.readouterr()
    assert err == "" and out == ""
    assert screened.warnings is not None and len(screened.warnings) == 2
    assert screened.warnings[0] >= 1 and screened.errors[0] == "TIFF: corrupt image data (decoder error -2)", screened
    assert screened.warnings[1] == 0 and screened.errors[1] is None


def test_palette_transparency_keeps_stored_colours_in_every_format():
    """The one convention: a transparent palette entry shows its palette colour (PNG natively, GIF via Pillow)."""
    pic = fi.picture().quantize(16)
    for fmt in ("PNG", "GIF"):
        data = fi.encode(pic, fmt, transparency=0)
        pixels, _ = graph_pixels(data)
        reference = np.asarray(pic.convert("RGB"))
        assert np.abs(pixels - resized(reference)).mean() <= 2.0, fmt


def test_screening_twice_gives_identical_payloads():
    values = [data for data, _ in VARIANTS.values()]
    a, b = screen_batch(values, ImageLimits.default()), screen_batch(values, ImageLimits.default())
    assert a.payloads == b.payloads and a.errors == b.errors and a.orientations == b.orientations


def test_exif_orientation_of_a_converted_image_is_applied_once():
    from PIL import Image

    upright = fi.picture()
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    out = io.BytesIO()
    stored.convert("CMYK").save(out, "JPEG", quality=95, exif=exif.tobytes())  # CMYK: converted by Pillow
    pixels, shape = graph_pixels(out.getvalue())
    assert shape == (fi.H, fi.W, 3)
    assert np.abs(pixels - resized(np.asarray(upright))).mean() <= 3.0


# ---- on Spark: a mixed folder, scored twice ------------------------------------------------------


@pytest.fixture
def mixed_folder(tmp_path) -> Path:
    folder = tmp_path / "mixed"
    (folder / "deep").mkdir(parents=True)
    for name in ("bmp_rle4", "bmp_16_565", "gif_offset_frame", "jpeg_trailer", "png_bad_crc_idat", "tiff_16bit_gray"):
        ext = {"bmp": "bmp", "gif": "gif", "jpeg": "jpg", "png": "png", "tiff": "tif"}[name.split("_")[0]]
        (folder / "deep" / f"{name}.{ext}").write_bytes(VARIANTS[name][0])
    for name, data in _refusals().items():
        (folder / f"{name}.bmp").write_bytes(data)
    (folder / "zero_bytes.jpg").write_bytes(b"")
    (folder / "deep" / "empty.PNG").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    (folder / "README").write_text("no extension")
    return folder


@pytest.mark.slow
@pytest.mark.connect
def test_a_mixed_folder_scores_the_same_twice_lazily_with_clean_errors(spark, mixed_folder, shapes_model, tmp_path):
    from image_transfer import read_images, score_images, scoring_run
    from image_transfer.imaging.files import skipped_files

    if not CONNECT:
        sc = spark.sparkContext
        sc.setJobGroup("fidelity-read", "read_images only")
        images = read_images(spark, str(mixed_folder))
        sc.setJobGroup("fidelity-other", "the rest")
        assert sc.statusTracker().getJobIdsForGroup("fidelity-read") == []  # lazy: no job yet
    else:
        images = read_images(spark, str(mixed_folder))
    runs = []
    for _ in range(2):
        scored = score_images(images, str(shapes_model), batch_size=4)
        rows = sorted((Path(r["path"]).name, r["prediction"], r["probability"], r["error"]) for r in scored.collect())
        runs.append((rows, scoring_run(scored).totals()))
    (first, totals), (second, _) = runs
    assert first == second  # identical rows, errors included
    by_name = {name: (prediction, error) for name, prediction, _, error in first}
    assert len(by_name) == 6 + len(_refusals()) + 2  # every matching file one row, zero-byte files too
    assert by_name["zero_bytes.jpg"] == (None, "empty image") and by_name["empty.PNG"] == (None, "empty image")
    scored_ok = {"bmp_rle4.bmp", "bmp_16_565.bmp", "gif_offset_frame.gif", "jpeg_trailer.jpg", "png_bad_crc_idat.png"}
    scored_ok.add("tiff_16bit_gray.tif")
    assert {n for n, (p, e) in by_name.items() if e is None and p is not None} == scored_ok
    errors = [e for _, (_, e) in by_name.items() if e is not None]
    assert all("0x" not in e and "object at" not in e and "\n" not in e for e in errors), errors
    assert by_name["bitfields.bmp"][1] == "BMP: unsupported bitfields layout"
    assert totals["rows"] == len(by_name)
    if not CONNECT:
        assert totals["rows_warned"] == 0
    assert skipped_files(spark, str(mixed_folder)).reasons == {"extension txt": 1, "extension ": 1}
    assert not skipped_files(spark, str(mixed_folder), extensions=["*"])


@pytest.mark.slow
def test_ingest_reports_what_it_skipped_and_star_takes_every_file(spark, mixed_folder, tmp_path, capsys):
    from image_transfer.jobs import cli

    assert cli.run(["ingest", "--images", str(mixed_folder), "--output", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "ingested 14 files" in out, out
    assert "skipped 2 files with other extensions (1 .txt, 1 without an extension)" in out, out
    assert cli.run(["ingest", "--images", str(mixed_folder), "--output", str(tmp_path / "b"), "--extensions", "*"]) == 0
    out = capsys.readouterr().out
    assert "ingested 16 files" in out and "skipped" not in out, out


def test_a_png_cut_before_iend_is_scored_from_pillows_pixels():
    """5 of 189 Pillow-readable mutations were refused for a missing IEND chunk that Pillow does not need."""
    import io

    import numpy as np
    from PIL import Image

    from image_transfer.imaging.screen import ImageLimits, screen_one

    pixels = (np.random.default_rng(3).random((40, 50, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    data = buf.getvalue()
    cut = data[: data.rfind(b"IEND") - 4]  # every IDAT there, no IEND chunk
    payload, error = screen_one(cut, ImageLimits.default())
    assert error is None
    assert (np.asarray(Image.open(io.BytesIO(payload)).convert("RGB")) == pixels).all()
    payload, error = screen_one(data[: len(data) // 2], ImageLimits.default())  # pixels missing: still refused
    assert payload is None and error.startswith("PNG: truncated")
