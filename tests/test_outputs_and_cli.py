"""Outputs never destroy what they must not; the CLI's help, version and early checks (new-user issue 1, 5, 10)."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import image_transfer
from image_transfer.errors import UserError
from image_transfer.jobs import cli
from image_transfer.storage.fs import COMMIT_MARKER
from image_transfer.storage.outputs import check_output, check_table, write_output

ROOT = Path(__file__).resolve().parents[1]


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes: what must stay untouched."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def images(fixtures_dir, tmp_path) -> Path:
    """A folder of 6 PNG and JPEG images and one text file."""
    folder = tmp_path / "images"
    folder.mkdir()
    for f in sorted((fixtures_dir / "images").rglob("*.*"))[::40]:
        shutil.copyfile(f, folder / f.name)
    (folder / "notes.txt").write_text("not an image")
    return folder


# ---- 1: an output is, contains or lies inside the input: refused, nothing touched --------------------------


@pytest.mark.parametrize(
    "where",
    ["same", "same-uri", "inside", "inside-uri", "parent"],
)
def test_ingest_refuses_an_output_over_its_images(images, no_spark, capsys, where):
    before = _tree(images.parent)
    output = {
        "same": str(images),
        "same-uri": f"file://{images}/",
        "inside": str(images / "out.parquet"),
        "inside-uri": f"file:{images}/sub/out",
        "parent": str(images.parent),
    }[where]
    assert cli.run(["ingest", "--images", str(images), "--output", output]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "input" in err and str(images) in err
    assert _tree(images.parent) == before
    assert cli.run(["ingest", "--images", str(images), "--output", output, "--overwrite"]) == 2  # not even then
    assert _tree(images.parent) == before


def test_an_output_through_a_symlink_is_the_same_place(images, no_spark, tmp_path, capsys):
    (tmp_path / "link").symlink_to(images)
    assert cli.run(["ingest", "--images", str(tmp_path / "link"), "--output", str(images)]) == 2
    assert "is the input" in capsys.readouterr().err


def test_score_refuses_its_input_and_what_it_did_not_write(spark, images, no_spark, tmp_path, capsys):
    dataset = tmp_path / "images.parquet"
    write_output(spark.createDataFrame([("a", b"x")], "path string, content binary"), str(dataset), command="ingest")
    plain, unrelated = tmp_path / "notes.csv", tmp_path / "reports"
    plain.write_text("a,b\n")
    unrelated.mkdir()
    (unrelated / "q3.pdf").write_bytes(b"%PDF")
    before = _tree(tmp_path)
    base = ["score", "--input", str(dataset), "--model", "m.keras", "--output"]
    for output, message in [
        (dataset, "is the input"),
        (dataset / "part", "lies inside the input"),
        (plain, "is an existing file"),
        (unrelated, "is not an output of image-transfer"),
    ]:
        assert cli.run([*base, str(output)]) == 2, output
        err = capsys.readouterr().err
        assert message in err and err.count("error:") == 1, err
    assert "--overwrite" in err
    assert cli.run([*base, str(dataset), "--overwrite"]) == 2  # never the input
    assert _tree(tmp_path) == before


def test_featurize_and_prepare_check_their_outputs_too(images, no_spark, tmp_path, capsys):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("keep")
    argv = ["featurize", "--input", str(images), "--model", "m.keras", "--output", str(tmp_path / "other")]
    assert cli.run(argv) == 2
    assert cli.run(["prepare", "--images", str(images), "--output", str(images / "ds")]) == 2
    assert cli.run(["prepare", "--images", str(images), "--output", str(tmp_path / "other")]) == 2
    labels = tmp_path / "other" / "labels.csv"
    labels.write_text("path,label\n")
    argv = ["prepare", "--images", str(images), "--labels", str(labels), "--output", str(tmp_path / "other")]
    assert cli.run([*argv, "--overwrite"]) == 2  # it holds the labels
    err = capsys.readouterr().err
    assert "contains the input" in err and "labels.csv" in err
    assert (tmp_path / "other" / "keep.txt").read_text() == "keep"


def test_incremental_refuses_only_an_output_in_the_images_folder(images, no_spark, shapes_model, tmp_path, capsys):
    base = ["score", "--images", str(images), "--checkpoint", str(tmp_path / "c"), "--model", str(shapes_model)]
    assert cli.run([*base, "--output", str(images / "scored")]) == 2
    assert "lies inside the input" in capsys.readouterr().err
    assert cli.run([*base, "--output", str(tmp_path / "scored"), "--overwrite"]) == 2
    assert "appended" in capsys.readouterr().err
    # An existing output is appended to, not replaced: no refusal before the session.
    (tmp_path / "scored").mkdir()
    (tmp_path / "scored" / "part-0.parquet").write_bytes(b"PAR1")
    with pytest.raises(AssertionError, match="SparkSession"):
        cli.run([*base, "--output", str(tmp_path / "scored")])


def test_ingest_writes_an_empty_folder_its_own_output_and_with_overwrite(images, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    assert cli.run(["ingest", "--images", str(images), "--output", str(out)]) == 0  # empty: may be used
    assert "command=ingest" in (out / COMMIT_MARKER).read_text()
    assert cli.run(["ingest", "--images", str(images), "--output", str(out)]) == 0  # its own: replaced
    stdout = capsys.readouterr().out
    assert "ingested 6 files" in stdout and "skipped 1 file with other extensions (1 .txt)" in stdout
    plain = tmp_path / "plain"
    plain.write_text("x")
    assert cli.run(["ingest", "--images", str(images), "--output", str(plain)]) == 2
    assert plain.read_text() == "x"
    assert cli.run(["ingest", "--images", str(images), "--output", str(plain), "--overwrite"]) == 0
    assert plain.is_dir() and (plain / COMMIT_MARKER).exists()


@pytest.mark.connect
def test_another_commands_output_needs_overwrite_and_old_markers_are_ours(spark, tmp_path):
    out = str(tmp_path / "scored")
    df = spark.range(4)
    write_output(df, out, command="score")
    assert "command=score" in (tmp_path / "scored" / COMMIT_MARKER).read_text()
    with pytest.raises(UserError, match="output of `image-transfer score`, not of `ingest`"):
        write_output(df, out, command="ingest")
    with pytest.raises(UserError, match="--overwrite"):
        check_output(out, command="ingest")
    check_output(out, command="score")
    write_output(spark.range(2), out, command="score")  # the same command: replaced
    write_output(spark.range(3), out, command="ingest", overwrite=True)
    assert spark.read.parquet(out).count() == 3
    (tmp_path / "scored" / COMMIT_MARKER).write_text("files=1 bytes=10\n")  # a marker of an older version
    (tmp_path / "scored" / f".{COMMIT_MARKER}.crc").unlink(missing_ok=True)
    check_output(out, command="featurize")
    write_output(spark.range(5), out)  # the API without a command: any output of this project
    unmarked = tmp_path / "data"
    spark.range(3).write.parquet(str(unmarked))
    with pytest.raises(UserError, match="not an output of image-transfer"):
        write_output(spark.range(1), str(unmarked))
    assert spark.read.parquet(str(unmarked)).count() == 3


@pytest.mark.connect
def test_an_interrupted_swap_belongs_to_the_command_that_wrote_it(spark, tmp_path):
    out = tmp_path / "out"
    write_output(spark.range(4), str(out), command="score")
    out.rename(tmp_path / ".out.previous-abc")  # killed between moving it aside and the new one in
    with pytest.raises(UserError, match="output of `image-transfer score`"):
        check_output(str(out), command="ingest")
    check_output(str(out), command="score")
    assert write_output(spark.range(7), str(out), command="score").count() == 7
    assert not list(tmp_path.glob(".out.*"))


def test_the_demo_replaces_its_own_outputs_only(spark, fixtures_dir, tmp_path):
    from image_transfer.jobs.demo import OUTPUTS, check_workdir

    for name, command in OUTPUTS.items():
        write_output(spark.range(2), str(tmp_path / name), command=command)
    check_workdir(tmp_path, fixtures_dir)  # a second run: its own outputs
    shutil.rmtree(tmp_path / "images.parquet")
    (tmp_path / "images.parquet").mkdir()
    (tmp_path / "images.parquet" / "mine.txt").write_text("x")
    with pytest.raises(UserError, match="not an output of image-transfer"):
        check_workdir(tmp_path, fixtures_dir)
    check_workdir(tmp_path, fixtures_dir, overwrite=True)
    with pytest.raises(UserError, match="lies inside the input"):
        check_workdir(fixtures_dir / "images" / "runs", fixtures_dir, overwrite=True)


# ---- 5: an input that is not Parquet: one line that says what to do ----------------------------------------


def test_score_a_folder_of_images_says_images_or_ingest(spark, images, fixtures_dir, tmp_path, capsys):
    model = str(fixtures_dir / "model" / "shapes.keras")
    deep = tmp_path / "deep" / "a" / "b"
    deep.mkdir(parents=True)
    shutil.copyfile(next(images.glob("*.png")), deep / "x.png")
    for folder in (images, fixtures_dir / "images", tmp_path / "deep"):
        argv = ["score", "--input", str(folder), "--model", model, "--output", str(tmp_path / "o")]
        assert cli.run(argv) == 2
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and "--images" in err and "image-transfer ingest" in err, err
        assert "UNABLE_TO_INFER_SCHEMA" not in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_an_input_that_is_not_parquet_is_one_line(spark, fixtures_dir, tmp_path, capsys):
    model = str(fixtures_dir / "model" / "shapes.keras")
    (tmp_path / "x.csv").write_text("path,content\na,b\n")
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "part-0.json").write_text('{"a": 1}\n')
    for source in (tmp_path / "x.csv", tmp_path / "json"):
        argv = ["score", "--input", str(source), "--model", model, "--output", str(tmp_path / "o")]
        assert cli.run(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "not a Parquet dataset" in err and "is not a Parquet file" in err, err
    argv = ["score", "--input", "main.ml.no_such_images", "--model", model, "--output", str(tmp_path / "o")]
    assert cli.run(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "PATH_NOT_FOUND" in err and "give it with --input-table" in err, err


# ---- 10: help, version, early checks -----------------------------------------------------------------------


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_has_help_and_its_default_shows():
    parser = cli.build_parser()
    missing, hidden = [], []
    for name, sub in _subparsers(parser).items():
        formatted = "".join(sub.format_help().split())  # argparse wraps lines (at hyphens too)
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flag = f"{name} {action.option_strings[0] if action.option_strings else action.dest}"
            if not action.help:
                missing.append(flag)
                continue
            default = action.default
            if default in (None, False, [], argparse.SUPPRESS):
                continue
            text = "".join((action.help % {**vars(action), "prog": sub.prog}).split())
            if "".join(str(default).split()) not in text or text not in formatted:
                hidden.append(f"{flag} (default {default!r})")
    assert not missing, f"options without help: {missing}"
    assert not hidden, f"defaults not in the help: {hidden}"


def test_version_and_a_description_for_users(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.run(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"image-transfer {image_transfer.__version__}"
    description = cli.build_parser().description
    assert description != cli.__doc__.splitlines()[0]
    assert "images" in description and "SparkSession" not in description


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["score", "--input", "i", "--model", "m", "--output", "o", "--top-k", "0"], "--top-k"),
        (["score", "--input", "i", "--model", "m", "--output", "o", "--batch-size", "-1"], "batch size"),
        (["featurize", "--input", "i", "--model", "m", "--output", "o", "--max-failed-fraction", "2"], "fraction"),
        (["score", "--input", "i", "--model", "m", "--output", "o", "--progress-interval", "0"], "--progress"),
        (["score", "--input", "i", "--model", "m", "--output", "o", "--max-image-bytes", "-1"], "bytes"),
        (["prepare", "--images", "i", "--output", "o", "--validation-fraction", "1"], "--validation-fraction"),
        (["prepare", "--images", "i", "--output", "o", "--extensions", ","], "--extensions"),
        (["train", "--data", "d", "--output-model", "m.keras", "--epochs", "0"], "epochs"),
        (["train", "--data", "d", "--output-model", "m.keras", "--batch-size", "0"], "batch-size"),
        (["train", "--data", "d", "--output-model", "m.keras", "--learning-rate", "0"], "--learning-rate"),
        (["evaluate", "--data", "d", "--model", "m", "--promote-to", "c", "--min-accuracy", "2"], "--min-accuracy"),
        (["evaluate", "--data", "d", "--model", "m", "--batch-size", "-1"], "batch size"),
    ],
    ids=lambda v: v if isinstance(v, str) else " ".join(v[:1] + v[-2:]),
)
def test_argument_checks_come_before_spark(no_spark, capsys, argv, message):
    assert cli.run(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("error:") == 1, err


def test_argument_checks_need_no_spark_at_all(tmp_path):
    """In a fresh process with a master that cannot start: exit 2 at once, so Spark never started."""
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable}
    code = "import sys; from image_transfer.jobs import cli; sys.exit(cli.run(sys.argv[1:]))"
    argv = ["score", "--input", "i", "--model", "m", "--output", str(tmp_path / "o"), "--master", "bogus://nowhere"]
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code, *argv, "--top-k", "0"], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "--top-k must be at least 1" in done.stderr and "Traceback" not in done.stderr
    assert time.perf_counter() - started < 60
    assert not (tmp_path / "o").exists()


# ---- 10: prepare with one class, ingest with no images ---------------------------------------------------


def test_prepare_refuses_one_class_before_writing(spark, fixtures_dir, tmp_path, capsys):
    root = tmp_path / "imgs" / "circle"
    root.mkdir(parents=True)
    for f in sorted((fixtures_dir / "images" / "circle").iterdir())[:4]:
        shutil.copyfile(f, root / f.name)
    out = tmp_path / "ds"
    assert cli.run(["prepare", "--images", str(tmp_path / "imgs"), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "one class (circle)" in err and "at least two" in err and err.count("error:") == 1
    assert not out.exists() and not list(tmp_path.glob(".ds*"))


def test_ingest_of_a_folder_without_images_says_what_it_skipped(spark, tmp_path, capsys):
    folder = tmp_path / "docs"
    folder.mkdir()
    for name in ("a.txt", "b.txt", "c.heic", "README"):
        (folder / name).write_text("x")
    out = tmp_path / "out"
    assert cli.run(["ingest", "--images", str(folder), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no image files" in err and "4 files with other extensions (2 .txt, 1 .heic, 1 without an extension)" in err
    assert "png" in err and not out.exists()
    (tmp_path / "empty").mkdir()
    assert cli.run(["ingest", "--images", str(tmp_path / "empty"), "--output", str(out)]) == 2
    assert "the folder has no files" in capsys.readouterr().err


# ---- tables: marked as they are made, and under a lease ------------------------------------------


def test_a_table_is_marked_in_the_step_that_makes_it(spark, tmp_path, monkeypatch):
    """The mark comes with the table: a run killed right after the table was made (here: any later
    ALTER TABLE fails, as if killed) still leaves a table the next run recognises as its own."""
    table = "marked_as_made"
    spark.sql(f"DROP TABLE IF EXISTS {table}")
    sql = type(spark).sql

    def killed_at_alter(self, query, *args, **kwargs):
        if query.lstrip().upper().startswith("ALTER TABLE"):
            raise RuntimeError("killed before the table was marked")
        return sql(self, query, *args, **kwargs)

    monkeypatch.setattr(type(spark), "sql", killed_at_alter)
    try:
        write_output(spark.range(3), str(tmp_path / "a"), table=table, command="score")
        check_table(spark, table, command="score")  # its own: no refusal
        write_output(spark.range(4), str(tmp_path / "b"), table=table, command="score")
        assert spark.table(table).count() == 4
        with pytest.raises(UserError, match="is the output of image-transfer score, not featurize"):
            check_table(spark, table, command="featurize")
    finally:
        monkeypatch.undo()
        spark.sql(f"DROP TABLE IF EXISTS {table}")


def test_a_table_has_one_writer_at_a_time(spark, tmp_path):
    """Another run writing the table (from another output in the same folder) holds its lease: refused."""
    table = "leased_table"
    holder = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "jobs" / "lease_holder.py"), str(tmp_path / f"{table}.table")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"table {table} is being written by another"):
            write_output(spark.range(3), str(tmp_path / "mine"), table=table, command="score")
        assert not (tmp_path / "mine").exists() and not spark.catalog.tableExists(table)
    finally:
        holder.kill()
        holder.wait(timeout=60)
