"""Reading folders of image files: every image file is read whatever its name, and what is left out is said."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from image_transfer.imaging.files import IMAGE_EXTENSIONS, read_image_files, skipped_files, spark_hides
from image_transfer.jobs import cli


@pytest.fixture(scope="module")
def camera_folder(fixtures_dir, tmp_path_factory) -> Path:
    """Two classes of images whose names a camera or a user might give, plus a hidden folder and a note."""
    root = tmp_path_factory.mktemp("camera")
    sources = sorted((fixtures_dir / "images").rglob("*.png")) or sorted((fixtures_dir / "images").rglob("*.*"))
    names = {
        "a": ["_DSC0001.JPG", ".hidden.jpg", "plain.jpg", "with space é.jpg"],
        "b": ["_scan_001.jpg", "IMG_0002.jpg", "x._COPYING_"],
        "b/_thumbs": ["t1.jpg"],
        ".git": ["objects.jpg"],
        ".ipynb_checkpoints": ["plain-checkpoint.jpg"],
    }
    i = 0
    for folder, files in names.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name in files:
            shutil.copyfile(sources[i % len(sources)], root / folder / name)
            i += 1
    (root / "a" / "notes.txt").write_text("not an image")
    (root / "b" / "_empty.jpg").write_bytes(b"")
    return root


def _names(df) -> list[str]:
    return sorted(Path(r["path"]).name for r in df.select("path").collect())


READ = ["IMG_0002.jpg", "_DSC0001.JPG", "_empty.jpg", "_scan_001.jpg", ".hidden.jpg", "plain.jpg", "t1.jpg"]
READ.append("with space é.jpg")


def test_spark_hides_names_as_its_listing_does():
    assert spark_hides("_DSC0001.JPG") and spark_hides(".x.jpg") and spark_hides("a.jpg._COPYING_")
    assert not spark_hides("a_b.jpg") and not spark_hides("_year=2024") and not spark_hides("_metadata")


@pytest.mark.slow
@pytest.mark.connect
def test_every_image_file_is_read_whatever_its_first_character(spark, camera_folder):
    images = read_image_files(spark, str(camera_folder))
    assert _names(images) == sorted(READ)
    rows = {Path(r["path"]).name: r["content"] for r in images.collect()}
    assert rows["_DSC0001.JPG"] == (camera_folder / "a" / "_DSC0001.JPG").read_bytes()  # the bytes, not a stub
    assert rows["_empty.jpg"] == b""
    assert all(r["path"].startswith("file:/") for r in images.select("path").collect())
    assert images.count() == len(READ)  # no file twice


@pytest.mark.connect
def test_what_is_left_out_is_counted_with_reasons_and_names(spark, camera_folder):
    skipped = skipped_files(spark, str(camera_folder))
    assert skipped.reasons == {
        "extension txt": 1,
        "extension _copying_": 1,
        "in hidden or Spark bookkeeping folders (.git, _temporary, ...)": 2,
    }
    assert skipped.count == 4 and len(skipped.examples) == 4
    text = skipped.describe()
    assert "2 files with other extensions (1 ._copying_, 1 .txt)" in text and "2 files in hidden" in text, text
    assert ".git/objects.jpg" in text and "a/notes.txt" in text, text
    everything = skipped_files(spark, str(camera_folder), extensions=["*"])
    assert everything.reasons == {
        "in hidden or Spark bookkeeping folders (.git, _temporary, ...)": 2,
        "being copied (._COPYING_)": 1,
    }
    # The file stream cannot read hidden names: they are reported, not lost.
    streamed = skipped_files(spark, str(camera_folder), streaming=True)
    hidden = sum(n for r, n in streamed.reasons.items() if "streaming file source" in r)
    assert hidden == 5  # _DSC0001, .hidden, _scan_001, _empty, _thumbs/t1


@pytest.mark.slow
def test_ingest_takes_hidden_names_and_says_what_it_skipped(spark, camera_folder, tmp_path):
    """In a process of its own, so the JVM's console is seen too: no WARN about the hidden staging folder."""
    out = tmp_path / "ingested"
    argv = ["ingest", "--images", str(camera_folder), "--output", str(out), "--extensions", "*", "--master", "local[1]"]
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable}
    done = subprocess.run(
        [sys.executable, "-m", "image_transfer", *argv], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "All paths were ignored" not in done.stderr and "staging" not in done.stderr, done.stderr[-3000:]
    printed = done.stdout
    assert f"ingested {len(READ) + 1} files" in printed, printed  # notes.txt too
    assert "skipped 3 files: 2 files in hidden or Spark bookkeeping folders" in printed, printed
    assert "1 file being copied" in printed and "reads every file" not in printed, printed
    assert _names(spark.read.parquet(str(out))) == sorted([*READ, "notes.txt"])


def test_prepare_reads_the_same_extensions_and_reports_skips_in_its_summary(spark, camera_folder, tmp_path, capsys):
    assert (
        ",".join(IMAGE_EXTENSIONS)
        in cli.build_parser().parse_args(["prepare", "--images", "x", "--output", "y"]).extensions
    )
    summary = tmp_path / "summary.json"
    out = tmp_path / "prepared"
    code = cli.run(["prepare", "--images", str(camera_folder), "--output", str(out), "--summary", str(summary)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "skipped 4 files" in printed.out, printed.out
    report = json.loads(summary.read_text())["skipped"]
    assert report["count"] == 4 and report["reasons"]["extension txt"] == 1 and report["examples"]
    assert _names(spark.read.parquet(str(out))) == sorted(READ)


def test_prepare_on_a_flat_folder_says_it_needs_a_folder_per_class(spark, fixtures_dir, tmp_path, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in sorted((fixtures_dir / "images").rglob("*.*"))[:4]:
        shutil.copyfile(f, flat / f.name)
    assert cli.run(["prepare", "--images", str(flat), "--output", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "one sub-folder per class" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "p").exists()
