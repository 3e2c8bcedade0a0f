"""Command line: the only wiring, and the only place a SparkSession is created.

Each subcommand parses its options, obtains the session once (``_spark``) and calls the stage
functions, which take DataFrames and plain values. Also the ``python_wheel_task`` entry point.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from image_transfer.api import ScoringOptions
from image_transfer.api.checks import IMAGE_EXTENSIONS
from image_transfer.errors import RunFailed, TooManyFailures, UserError
from image_transfer.runtime import get_spark, parse_conf, quiet_interrupts
from image_transfer.version import __version__

Handler = Callable[[argparse.Namespace], int]

DESCRIPTION = (
    "Score and embed images with a Keras model on Spark, and train one on your labelled images by "
    "transfer learning: ingest a folder of images, score or featurize it, prepare a labelled folder, "
    "train, evaluate and promote. Try `image-transfer demo` on the bundled fixtures."
)
IMAGES_HINT = (
    "score a folder of image files with --images (incremental, with --checkpoint), or read it into "
    "Parquet first with `image-transfer ingest --images DIR --output PATH`"
)
PREPARE_HINT = "make a dataset of a labelled folder first with `image-transfer prepare --images DIR --output PATH`"


def _add_common_scoring_options(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="Parquet dataset path with the images")
    src.add_argument("--input-table", help="table name with the images (catalog.schema.table)")
    src.add_argument("--images", help="incremental: folder of image files; only files no earlier run took are scored")
    p.add_argument(
        "--model",
        required=True,
        help="Keras model file (.keras), SavedModel directory or LiteRT file (.tflite, its class names and "
        "preprocessing in <file>.json), or an MLflow URI: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN/PATH",
    )
    p.add_argument(
        "--output",
        help="Parquet output path: a new path, an empty folder or an earlier output of this command, "
        "replaced atomically (with --images: appended, exactly once)",
    )
    p.add_argument("--output-table", help="also save the output as this table (with --images: append to it)")
    _add_overwrite_option(p)
    _add_wait_option(p)
    _add_incremental_options(p)
    ScoringOptions.add_arguments(p)
    p.add_argument(
        "--rows-per-file",
        type=int,
        default=None,
        help="output rows per Parquet file (default: about 256 MB files for the output's row size)",
    )
    p.add_argument("--summary", help="write a JSON run summary here")
    p.add_argument(
        "--progress-interval",
        type=float,
        help="seconds between progress reports (default 1 on a terminal, 30 in logs; batch scoring)",
    )
    _add_spark_options(p)


def _add_incremental_options(p: argparse.ArgumentParser) -> None:
    from image_transfer.api.incremental import DEFAULT_MAX_FILES_PER_TRIGGER, SOURCES

    p.add_argument("--checkpoint", help="with --images (required): streaming checkpoint, what earlier runs took")
    p.add_argument(
        "--source",
        choices=SOURCES,
        default="auto",
        help="with --images: file discovery; auto = Auto Loader (cloudFiles) on Databricks, else binaryFile "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--max-files-per-trigger",
        type=int,
        default=DEFAULT_MAX_FILES_PER_TRIGGER,
        help="with --images: files per micro-batch (default: %(default)s)",
    )
    p.add_argument(
        "--extensions",
        default=",".join(IMAGE_EXTENSIONS),
        help="with --images: comma-separated file extensions (default: %(default)s)",
    )


def _add_overwrite_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace what is at --output even if it is not an earlier output of this command (never the input)",
    )


def _add_wait_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--wait",
        nargs="?",
        type=float,
        const=math.inf,
        default=None,
        metavar="SECONDS",
        help="when another run is writing --output (it holds the output's lease), wait for it to finish: "
        "SECONDS at most, or as long as it takes (default: fail at once, exit 2, naming that run)",
    )


def _wait(args: argparse.Namespace) -> float | None:
    """The ``--wait`` seconds (None: do not wait); UserError when negative."""
    wait = getattr(args, "wait", None)
    if wait is not None and not wait >= 0:
        raise UserError(f"--wait must be at least 0 seconds, got {wait}")
    return wait


def _add_spark_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--master", help="Spark master for a local run (default local[*])")
    p.add_argument(
        "--conf",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Spark setting for the session (repeatable), e.g. spark.executor.resource.gpu.amount=1",
    )
    p.add_argument("--remote", help="a Spark Connect server (sc://host:port, or local[2] to start one locally)")


def build_parser() -> argparse.ArgumentParser:
    """The ``image-transfer`` argument parser (also used by tests to check job parameters)."""
    parser = argparse.ArgumentParser(prog="image-transfer", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND")

    _add_score_parser(sub)
    _add_featurize_parser(sub)
    _add_ingest_parser(sub)
    _add_training_parsers(sub)
    _add_inspect_parser(sub)
    _add_demo_parser(sub)
    _add_preflight_parser(sub)
    return parser


def _add_score_parser(sub: Any) -> None:
    p = sub.add_parser("score", help="classify images: prediction, probability, top_k, error")
    _add_common_scoring_options(p)
    p.add_argument("--top-k", type=int, default=5, help="how many classes to report per image (default: %(default)s)")
    p.set_defaults(handler=_cmd_score)


def _add_featurize_parser(sub: Any) -> None:
    p = sub.add_parser("featurize", help="embed images with a model layer: embedding, error")
    _add_common_scoring_options(p)
    p.add_argument("--layer", help="layer whose output is the embedding (default: before the classifier)")
    p.set_defaults(handler=_cmd_featurize)


def _add_ingest_parser(sub: Any) -> None:
    p = sub.add_parser("ingest", help="read a folder of image files into Parquet (path, content)")
    p.add_argument(
        "--images", required=True, help=f"folder of images (read recursively: {', '.join(IMAGE_EXTENSIONS)})"
    )
    p.add_argument(
        "--output",
        required=True,
        help="Parquet output path: a new path, an empty folder or an earlier ingest output (replaced atomically)",
    )
    p.add_argument(
        "--extensions",
        default=",".join(IMAGE_EXTENSIONS),
        help="comma-separated file extensions to read, or * for every file (default: %(default)s)",
    )
    _add_overwrite_option(p)
    _add_wait_option(p)
    _add_spark_options(p)
    p.set_defaults(handler=_cmd_ingest)


def _add_inspect_parser(sub: Any) -> None:
    p = sub.add_parser("inspect", help="check a model as scoring would, without Spark: input size, outputs, classes")
    p.add_argument(
        "--model", required=True, help="Keras model file (.keras), SavedModel directory, .tflite file, or an MLflow URI"
    )
    p.add_argument("--layer", help="with --embed: the embedding layer (default: before the classifier)")
    p.add_argument("--embed", action="store_true", help="check it for featurize (default: for score, a classifier)")
    ScoringOptions.add_arguments(p, only=("trust_model_code",))
    p.set_defaults(handler=_cmd_inspect)


def _add_demo_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="run the pipeline on the bundled fixtures with local Spark")
    p.add_argument("--fixtures", default=None, help="fixtures folder (default: the repo's fixtures/)")
    p.add_argument("--workdir", default="runs/demo", help="where the demo writes its outputs (default: %(default)s)")
    p.add_argument("--master", help="Spark master (default local[2])")
    p.add_argument("--conf", action="append", default=[], metavar="KEY=VALUE", help="Spark setting (repeatable)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace what is in --workdir under the demo's output names even if the demo did not write it",
    )
    p.set_defaults(handler=_cmd_demo)


def _add_preflight_parser(sub: Any) -> None:
    from image_transfer.jobs.workspace import DEFAULT_SPARK_VERSION, DEFAULT_TIMEOUT_SECONDS

    p = sub.add_parser("preflight", help="check that a Databricks workspace can run the bundle's jobs")
    p.add_argument("--profile", help="~/.databrickscfg profile (default: the SDK's usual configuration)")
    p.add_argument("--host", help="workspace URL (or DATABRICKS_HOST)")
    p.add_argument(
        "--token",
        help="personal access token; prefer DATABRICKS_TOKEN (command lines are visible to other users)",
    )
    p.add_argument(
        "--spark-version", default=DEFAULT_SPARK_VERSION, help="runtime key the jobs use (default: %(default)s)"
    )
    p.add_argument("--node-type-id", help="GPU node type the jobs use (default: list the GPU types offered)")
    p.add_argument(
        "--path",
        action="append",
        dest="paths",
        default=[],
        help="/Volumes/<catalog>/<schema>/<volume>/... or <catalog>.<schema>.<volume> that must exist (repeatable)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_SECONDS,
        help="seconds per request and retry budget (default: %(default)s)",
    )
    p.set_defaults(handler=_cmd_preflight)


def _add_limit_options(p: argparse.ArgumentParser) -> None:
    ScoringOptions.add_arguments(p, only=("max_image_bytes", "max_pixels"))


def _image_limits(args: argparse.Namespace) -> Any:
    from image_transfer.api.checks import image_limits

    return image_limits(max_bytes=args.max_image_bytes, max_pixels=args.max_pixels)


def session(args: argparse.Namespace, what: str) -> Any:
    """The command's session (``get_spark``) from its ``--master``, ``--conf`` and ``--remote``."""
    conf = parse_conf(getattr(args, "conf", None))
    spark = get_spark(f"image-transfer {what}", master=args.master, conf=conf, remote=getattr(args, "remote", None))
    quiet_interrupts(spark)
    return spark


def _checked_session(
    args: argparse.Namespace,
    command: str,
    outputs: Sequence[str | None],
    inputs: Sequence[str | None],
    *,
    append: bool = False,
    check_model: Callable[[], None] | None = None,
) -> Any:
    """The command's session, once its outputs are checked (``outputs.check_output``): none may overlap an
    input or replace what it must not. Local paths are checked before Spark starts, others with it; then
    ``check_model`` (the model file), also before Spark starts."""
    from image_transfer.api.checks import check_output

    def check(spark: Any) -> bool:
        return all(
            [
                check_output(out, command=command, inputs=inputs, overwrite=overwrite, append=append, spark=spark)
                for out in outputs
                if out
            ]
        )

    overwrite = bool(getattr(args, "overwrite", False))
    checked = check(None)
    if check_model is not None:  # the model file, also before Spark starts
        check_model()
    spark = session(args, command)
    if not checked:
        check(spark)
    return spark


def _check_model_early(
    model: str, *, mode: str | None, layer: str | None = None, trust: bool = False, options: Any = None
) -> None:
    """The model file checked before Spark starts (``api.checks.check_model``)."""
    from image_transfer.api.checks import check_model

    check_model(model, mode=mode, layer=layer, trust=trust, options=options)


def _scoring_options(args: argparse.Namespace, mode: str) -> ScoringOptions:
    """The options object of the flags, checked before any Spark work (a UserError names the flag)."""
    options = ScoringOptions.from_args(args)
    if mode == "classify" and args.top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {args.top_k}")
    if args.rows_per_file is not None and args.rows_per_file < 1:
        raise UserError(f"--rows-per-file must be at least 1, got {args.rows_per_file}")
    if args.progress_interval is not None and args.progress_interval <= 0:
        raise UserError(f"--progress-interval must be above 0, got {args.progress_interval}")
    if args.max_files_per_trigger < 1:
        raise UserError(f"--max-files-per-trigger must be at least 1, got {args.max_files_per_trigger}")
    return options


def _run_scoring(args: argparse.Namespace, mode: str) -> int:
    from image_transfer.api.checks import output_lease

    options = _scoring_options(args, mode)
    command = "score" if mode == "classify" else "featurize"

    def check_model() -> None:
        _check_model_early(
            args.model, mode=mode, layer=getattr(args, "layer", None), trust=options.trust_model_code, options=options
        )

    if args.images is not None:
        return _run_incremental(args, mode, options, check_model)
    if args.checkpoint is not None:
        raise UserError("--checkpoint goes with --images (incremental scoring)")
    if args.output is None:
        raise UserError("--output is required")
    wait = _wait(args)
    spark = _checked_session(args, command, [args.output], [args.input], check_model=check_model)
    with output_lease(spark, args.output, command=command, wait=wait, table=args.output_table):
        _score_leased(spark, args, mode, command, options, wait)
    return 0


def _score_leased(
    spark: Any, args: argparse.Namespace, mode: str, command: str, options: ScoringOptions, wait: float | None
) -> None:
    """Batch scoring, holding the output's lease."""
    from image_transfer import api

    source = api.read_input(
        spark, path=args.input, table=args.input_table, images_hint=IMAGES_HINT, table_flag="--input-table"
    )
    if mode == "classify":
        scored = api.score_images(source, args.model, top_k=args.top_k, options=options)
    else:
        scored = api.featurize_images(source, args.model, layer=args.layer, options=options)
    api.write_scored(
        scored,
        args.output,
        output_table=args.output_table,
        overwrite=args.overwrite,
        rows_per_file=args.rows_per_file,
        wait=wait,
        progress_interval=args.progress_interval,
        summary_path=args.summary,
    )


def _run_incremental(
    args: argparse.Namespace, mode: str, options: ScoringOptions, check_model: Callable[[], None]
) -> int:
    from image_transfer.api import incremental
    from image_transfer.api.checks import skipped_files
    from image_transfer.api.writing import write_summary

    if not args.checkpoint:
        raise UserError("--images needs --checkpoint (where the stream records what it has scored)")
    if bool(args.output) == bool(args.output_table):
        raise UserError("with --images give --output (a Parquet dataset) or --output-table (a table)")
    for flag, value in (("--rows-per-file", args.rows_per_file), ("--progress-interval", args.progress_interval)):
        if value is not None:
            raise UserError(f"{flag} does not apply to incremental scoring (--images): each micro-batch is reported")
    if args.overwrite:
        raise UserError("--overwrite does not apply to incremental scoring (--images): the output is appended to")
    if args.wait is not None:
        raise UserError("--wait does not apply to incremental scoring (--images): its checkpoint orders the runs")
    command = "score" if mode == "classify" else "featurize"
    spark = _checked_session(args, command, [args.output], [args.images], append=True, check_model=check_model)
    common = dict(
        checkpoint=args.checkpoint,
        output=None if args.output_table else args.output,
        output_table=args.output_table,
        source=args.source,
        max_files_per_trigger=args.max_files_per_trigger,
        extensions=[e.strip() for e in args.extensions.split(",") if e.strip()],
        print_fn=print,
        options=options,
    )
    if mode == "classify":
        result = incremental.score_new_images(spark, args.images, args.model, top_k=args.top_k, **common)
    else:
        result = incremental.featurize_new_images(spark, args.images, args.model, layer=args.layer, **common)
    skipped = skipped_files(spark, args.images, extensions=common["extensions"], streaming=True)
    print(result.describe())
    if skipped:
        print(f"skipped {skipped.describe()}")
    write_summary({**result.to_dict(), "skipped": {**skipped.to_dict(), "text": skipped.describe()}}, args.summary)
    result.check()
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    return _run_scoring(args, "classify")


def _cmd_featurize(args: argparse.Namespace) -> int:
    return _run_scoring(args, "embed")


def _cmd_ingest(args: argparse.Namespace) -> int:
    from image_transfer.api import read_images, write_output
    from image_transfer.api.checks import output_lease, skipped_files

    wait = _wait(args)
    extensions = [e.strip().lstrip(".") for e in args.extensions.split(",") if e.strip().lstrip(".")]
    if not extensions:
        raise UserError("--extensions names no extension (* reads every file)")
    reads = ", ".join(extensions)
    spark = _checked_session(args, "ingest", [args.output], [args.images])
    with output_lease(spark, args.output, command="ingest", wait=wait):
        images = read_images(spark, args.images, extensions=extensions)
        skipped = skipped_files(spark, args.images, extensions=extensions).describe()
        listed = images.count()
        if not listed:
            found = f"skipped {skipped}" if skipped else "the folder has no files"
            raise UserError(f"no image files under {args.images} ({found}); ingest reads {reads}; nothing written")
        rows = write_output(images, args.output, rows=listed, command="ingest", overwrite=args.overwrite).count()
    print(f"ingested {rows} files from {args.images} into {args.output}")
    if skipped:
        hint = "" if "*" in extensions else f": ingest reads {reads} (--extensions '*' reads every file)"
        print(f"skipped {skipped}{hint}")
    return 0


def _add_dataset_options(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="prepared Parquet dataset path")
    src.add_argument("--data-table", help="prepared dataset table")


def _add_training_parsers(sub: Any) -> None:
    """``prepare``, ``train`` and ``evaluate`` (options as the bundle's training job passes them)."""
    _add_prepare_parser(sub)
    _add_train_parser(sub)
    _add_evaluate_parser(sub)


def _add_prepare_parser(sub: Any) -> None:
    p = sub.add_parser("prepare", help="labelled image folder -> Parquet dataset with a train/validation split")
    p.add_argument("--images", required=True, help="folder of images, one subfolder per class (read recursively)")
    p.add_argument(
        "--output",
        required=True,
        help="Parquet dataset path: a new path, an empty folder or an earlier prepare output (replaced atomically)",
    )
    p.add_argument("--output-table", help="also save the dataset as this table")
    _add_overwrite_option(p)
    _add_wait_option(p)
    p.add_argument("--labels", help="CSV (header path,label) or table giving labels by path, instead of folders")
    p.add_argument(
        "--validation-fraction", type=float, default=0.2, help="share of images for validation (default: %(default)s)"
    )
    p.add_argument(
        "--extensions",
        default=",".join(IMAGE_EXTENSIONS),
        help="comma-separated file extensions to read, or * for every file (default: %(default)s)",
    )
    p.add_argument("--summary", help="write a JSON summary (counts, the first rejected files) here")
    p.add_argument(
        "--rejected",
        help="write every rejected file (CSV path,reason) here (default: beside --summary, as *.rejected.csv)",
    )
    _add_limit_options(p)
    _add_spark_options(p)
    p.set_defaults(handler=_cmd_prepare)


def _add_train_parser(sub: Any) -> None:
    p = sub.add_parser("train", help="fine-tune a pretrained backbone on a prepared dataset")
    _add_dataset_options(p)
    p.add_argument("--output-model", required=True, help="where to save the model (.keras): a new file")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing --output-model file (never the backbone)"
    )
    p.add_argument(
        "--backbone",
        default="mobilenet_v2",
        help="mobilenet_v2, resnet50, efficientnet_b0, or a .keras file (default: %(default)s)",
    )
    p.add_argument(
        "--weights",
        default="imagenet",
        help="imagenet (downloaded), none, or a weights file (default: %(default)s)",
    )
    p.add_argument("--epochs", type=int, default=5, help="epochs of training the new head (default: %(default)s)")
    p.add_argument(
        "--fine-tune-layers",
        type=int,
        default=0,
        help="then unfreeze this many top backbone layers, at a tenth of the learning rate (default: %(default)s)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="images per training step (default: %(default)s)")
    p.add_argument(
        "--learning-rate",
        type=float,
        default=1e-3,
        help="of the head phase; fine-tuning uses a tenth (default: %(default)s)",
    )
    p.add_argument("--image-size", type=int, default=None, help="input size (default 224, or the backbone file's)")
    p.add_argument("--cache-dir", help="parent dir (URL) for the feed cache: a Volume or file:///dbfs/... on clusters")
    p.add_argument(
        "--data-path",
        default="auto",
        choices=["auto", "petastorm", "arrow"],
        help="how data reaches TensorFlow; auto: Petastorm where installed, else Arrow (default: %(default)s)",
    )
    p.add_argument("--mixed-precision", action="store_true", help="compute in float16 on GPUs (ignored without a GPU)")
    p.add_argument(
        "--head-input",
        default="features",
        choices=["features", "images"],
        help="what the frozen phase trains on: features (embedded once by the executors; no augmentation) "
        "or images (default: %(default)s)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="train the image phases across this many nodes (a barrier stage of MultiWorkerMirroredStrategy "
        "workers; classic clusters, --cache-dir on a Volume); 1: this node's GPUs (default: %(default)s)",
    )
    p.add_argument("--metrics", help="metrics JSON path (default beside the model); a PNG of the curves goes beside")
    p.add_argument(
        "--register-as",
        help="register the model as a new version of this MLflow model (catalog.schema.model on Unity Catalog)",
    )
    ScoringOptions.add_arguments(p, only=("trust_model_code", "litert_cache"))  # a --backbone file; the features
    _add_spark_options(p)
    p.set_defaults(handler=_cmd_train)


def _add_evaluate_parser(sub: Any) -> None:
    p = sub.add_parser("evaluate", help="accuracy of a model on one split of a prepared dataset")
    _add_dataset_options(p)
    p.add_argument("--model", required=True, help="Keras model file (.keras) with class names, or models:/NAME/VERSION")
    p.add_argument(
        "--split",
        default="validation",
        choices=["train", "validation"],
        help="the split to score (default: %(default)s)",
    )
    p.add_argument("--metrics", help="write the metrics JSON here")
    p.add_argument(
        "--promote-to",
        metavar="ALIAS",
        help="set this alias on the evaluated registered version if good enough (exit 1 with the reason if not)",
    )
    p.add_argument(
        "--min-accuracy",
        type=float,
        default=0.0,
        help="promotion needs at least this accuracy (default: %(default)s)",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=0.0,
        help="promotion allows this much lower accuracy than the alias's current version on the same split "
        "(default: %(default)s)",
    )
    ScoringOptions.add_arguments(p)
    _add_spark_options(p)
    p.set_defaults(handler=_cmd_evaluate)


def _cmd_prepare(args: argparse.Namespace) -> int:
    from image_transfer.api import prepare_dataset

    if not 0.0 <= args.validation_fraction < 1.0:
        raise UserError(f"--validation-fraction must be in [0, 1), got {args.validation_fraction}")
    if not [e for e in args.extensions.split(",") if e.strip()]:
        raise UserError("--extensions names no extension")
    limits = _image_limits(args)
    inputs = [args.images, args.labels if args.labels and args.labels.lower().endswith(".csv") else None]
    wait = _wait(args)
    spark = _checked_session(args, "prepare", [args.output], inputs)
    rejected = args.rejected or (str(Path(args.summary).with_suffix(".rejected.csv")) if args.summary else None)
    result = prepare_dataset(
        spark,
        args.images,
        args.output,
        output_table=args.output_table,
        labels=args.labels,
        validation_fraction=args.validation_fraction,
        extensions=args.extensions.split(","),
        limits=limits,
        rejected_file=rejected,
        overwrite=args.overwrite,
        wait=wait,
    )
    print(result.describe())
    if args.summary:
        Path(args.summary).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return 0


def _publish_task_value(key: str, value: Any) -> None:
    """Hand ``value`` to later tasks of a Databricks job run; nothing elsewhere."""
    try:
        from image_transfer.jobs.workspace import set_task_value
    except ImportError:
        return
    set_task_value(key, value)


def _cmd_train(args: argparse.Namespace) -> int:
    from image_transfer.api import TrainConfig, read_input, train_model
    from image_transfer.api.checks import check_output_model

    if args.learning_rate <= 0:
        raise UserError(f"--learning-rate must be above 0, got {args.learning_rate}")
    config = TrainConfig(
        backbone=args.backbone,
        weights=args.weights,
        epochs=args.epochs,
        fine_tune_layers=args.fine_tune_layers,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        image_size=args.image_size,
        data_path=args.data_path,
        cache_dir=args.cache_dir,
        mixed_precision=args.mixed_precision,
        trust_model_code=bool(args.trust_model_code),
        litert_cache=args.litert_cache,
        head_input=args.head_input,
        workers=args.workers,
    )
    check_output_model(args.output_model, args.backbone, overwrite=args.overwrite)
    if args.backbone.endswith(".keras"):
        _check_model_early(args.backbone, mode=None, trust=bool(args.trust_model_code))
    spark = session(args, "train")
    data = read_input(spark, path=args.data, table=args.data_table, images_hint=PREPARE_HINT, table_flag="--data-table")
    result = train_model(
        data,
        config=config,
        output_model=args.output_model,
        metrics_path=args.metrics,
        register_as=args.register_as,
        overwrite=args.overwrite,
    )
    print(result.describe())
    _publish_task_value("model_path", result.model_path)
    _publish_task_value("model_uri", result.model_uri)
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from image_transfer.api.checks import describe_model

    report = describe_model(args.model, embed=args.embed, layer=args.layer, trust=bool(args.trust_model_code))
    print(json.dumps(report, indent=2))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from image_transfer.api import evaluate_model, read_input

    if args.promote_to is None and (args.min_accuracy or args.tolerance):
        raise UserError("--min-accuracy and --tolerance only apply with --promote-to ALIAS")
    if not 0.0 <= args.min_accuracy <= 1.0:
        raise UserError(f"--min-accuracy must be between 0 and 1, got {args.min_accuracy}")
    if args.tolerance < 0:
        raise UserError(f"--tolerance must be at least 0, got {args.tolerance}")
    options = ScoringOptions.from_args(args)
    _check_model_early(args.model, mode="classify", trust=options.trust_model_code, options=options)
    spark = session(args, "evaluate")
    data = read_input(spark, path=args.data, table=args.data_table, images_hint=PREPARE_HINT, table_flag="--data-table")
    if args.promote_to is None:
        result = evaluate_model(data, model=args.model, split=args.split, metrics_path=args.metrics, options=options)
        print(result.describe())
        return 0
    from image_transfer.api import PromotionRefused, promote_model

    result, decision = promote_model(
        data,
        model=args.model,
        alias=args.promote_to,
        min_accuracy=args.min_accuracy,
        tolerance=args.tolerance,
        split=args.split,
        metrics_path=args.metrics,
        options=options,
    )
    print(result.describe())
    if not decision.promoted:  # exit 1 with the reason; the JSON and the MLflow run have the decision
        raise PromotionRefused(decision.describe())
    print(decision.describe())
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from image_transfer.jobs.demo import run_demo

    return run_demo(args)


def _cmd_preflight(args: argparse.Namespace) -> int:
    from image_transfer.jobs import workspace

    if args.timeout <= 0:
        raise UserError("--timeout must be positive")
    client = workspace.connect(profile=args.profile, host=args.host, token=args.token, timeout=args.timeout)
    checks = workspace.preflight(
        client, spark_version=args.spark_version, node_type_id=args.node_type_id, paths=args.paths
    )
    print(workspace.render_table(checks))
    return 0 if all(check.ok for check in checks) else 1


# Options naming local files or folders: made absolute on the driver before any work (``absolute_paths``).
PATH_OPTIONS = (
    "data",
    "output_model",
    "cache_dir",
    "metrics",
    "input",
    "images",
    "checkpoint",
    "output",
    "summary",
    "rejected",
    "model",
)


def absolute_paths(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with every local relative path made absolute against this directory (``fs.local_absolute``):
    executors, barrier training workers and Spark's JVM may run in others. URIs (``dbfs:/``, ``s3://``,
    ``file:``, ``models:/``, ``runs:/``), backbone names, ``--weights imagenet|none`` and an input spelled like a
    table name (``schema.table``) that is no local path stay as typed."""
    import os

    from image_transfer.api.checks import local_absolute, looks_like_table

    for name in PATH_OPTIONS:
        value = getattr(args, name, None)
        if not isinstance(value, str) or not value:
            continue
        if name in ("data", "input") and looks_like_table(value) and not os.path.exists(value):
            continue  # as typed: reading it fails with a hint to give it as a table
        setattr(args, name, local_absolute(value))
    backbone = getattr(args, "backbone", None)
    if isinstance(backbone, str) and backbone.endswith(".keras"):
        args.backbone = local_absolute(backbone)
    weights = getattr(args, "weights", None)
    if isinstance(weights, str) and weights not in ("imagenet", "none"):
        args.weights = local_absolute(weights)
    labels = getattr(args, "labels", None)
    if isinstance(labels, str) and labels.lower().endswith(".csv"):
        args.labels = local_absolute(labels)
    return args


def run(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the subcommand; returns the exit status.

    0 success; 1 the run failed (the model raised, or ``evaluate --promote-to`` refused the version:
    the JSON says why); 2 a user error (nothing written); 3 too many rows failed (the output and
    summary are written).
    """
    parser = build_parser()
    args = absolute_paths(parser.parse_args(list(sys.argv[1:] if argv is None else argv)))
    handler: Handler = args.handler
    try:
        return handler(args)
    except UserError as exc:
        print(f"image-transfer {args.command}: error: {as_flags(str(exc))}", file=sys.stderr)
        return 2
    except TooManyFailures as exc:
        print(f"image-transfer {args.command}: failed: {as_flags(str(exc))}", file=sys.stderr)
        return 3
    except RunFailed as exc:
        print(f"image-transfer {args.command}: failed: {as_flags(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"image-transfer {args.command}: interrupted; the previous output is intact", file=sys.stderr)
        return 130


def as_flags(message: str) -> str:
    """A message with the API's option names (``max_failed_fraction``) as the flags a CLI user typed
    (``name=value`` spellings, the API's own hints, stay)."""
    for name in ScoringOptions.names():
        if "_" in name:
            message = re.sub(rf"(?<![\w-]){name}(?![\w=])", ScoringOptions.flag(name), message)
    return message


def main() -> None:
    """Entry point of the ``image-transfer`` console script and of ``python_wheel_task``.

    Exits non-zero on failure, so a Databricks task fails too.
    """
    code = run()
    if code:
        sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
