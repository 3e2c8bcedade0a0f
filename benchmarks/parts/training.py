"""Part 2, training input: images/s of ``image_transfer.training.feed`` over Petastorm and over Arrow.

Against the floor, the same ``feed.image_pipeline`` over the encoded bytes held in memory; input
alone (the pipeline drained with no model), and one training epoch of the project's classifier
(``image_transfer.training.train``: frozen MobileNetV2 + softmax head, ``train_on_batch``).

Part 5, frozen head: ``train``'s frozen phase from features (embedded once) against from images, same
data and epochs, in one run: wall times, one featurization pass alone, and both accuracies.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import replace
from typing import Any

from data import CACHE, CLASSES, MODEL_PATH, SIZE
from harness import FLOOR_THREADS, configure_tf, load_average, read_local, run_child, spark_session

NAME = "training_input"


def run(files: list[str], repeats: int) -> dict[str, Any]:
    return run_child("training", {"files": files, "model": str(MODEL_PATH), "repeats": repeats, "train_repeats": 1})


def child(cfg: dict[str, Any]) -> dict[str, Any]:
    configure_tf(FLOOR_THREADS)
    import tensorflow as tf

    try:
        from image_transfer.training import feed
    except Exception as exc:  # noqa: BLE001
        return {"skipped": f"image_transfer.training.feed does not import: {type(exc).__name__}: {exc}"}
    from image_transfer.training.train import build_backbone, build_classifier

    files = cfg["files"]
    local = read_local(files, ["content", "label_index"])
    n = len(local["content"])
    spark = spark_session("bench training")
    df = spark.read.parquet(*files).select("content", "label_index")
    batch = 32  # TrainConfig's default
    backbone, preprocess, size = build_backbone("mobilenet_v2", weights="none", image_size=SIZE)
    model = build_classifier(backbone, preprocess, classes=CLASSES, size=size, dropout=0.2)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")

    raw_memory = tf.data.Dataset.from_tensor_slices(
        {"content": tf.constant(local["content"]), "label_index": tf.constant(local["label_index"], tf.int32)}
    ).batch(64)

    def memory_dataset(training: bool) -> Any:
        return feed.image_pipeline(raw_memory, batch_size=batch, image_size=(size, size), training=training, seed=0)

    for x, y in memory_dataset(True).take(1):  # trace the train step, not timed
        model.train_on_batch(x, y)

    def input_pass(ds: Any) -> tuple[float, int]:
        iterator = iter(ds)
        t0 = time.perf_counter()
        count = 0
        for x, _ in iterator:
            count += int(x.shape[0])
        seconds = time.perf_counter() - t0
        del iterator
        return seconds, count

    def train_pass(ds: Any) -> tuple[float, int]:
        iterator = iter(ds)
        t0 = time.perf_counter()
        count = 0
        for x, y in iterator:
            model.train_on_batch(x, y)  # returns the loss as a Python float: synchronous
            count += int(x.shape[0])
        seconds = time.perf_counter() - t0
        del iterator
        return seconds, count

    feeds: dict[str, Any] = {}
    stack = contextlib.ExitStack()
    out: dict[str, Any] = {"images": n, "batch_size": batch, "paths": {}, "skipped_paths": {}}
    for path in ("petastorm", "arrow"):
        t0 = time.perf_counter()
        try:
            feeds[path] = stack.enter_context(
                feed.open_feed(df, path=path, cache_dir=str(CACHE), columns=("content", "label_index"))
            )
        except Exception as exc:  # noqa: BLE001 - report, do not hide
            out["skipped_paths"][path] = f"{type(exc).__name__}: {exc}"
            print(f"[training] {path} skipped: {exc}", flush=True)
            continue
        out["paths"][path] = {"open_seconds": time.perf_counter() - t0, "rows": feeds[path].rows}
    out["paths"]["floor"] = {"open_seconds": 0.0, "rows": n}

    def dataset(path: str, training: bool) -> Any:
        if path == "floor":
            return contextlib.nullcontext(memory_dataset(training))
        return feeds[path].make_tf_dataset(batch_size=batch, image_size=(size, size), training=training, num_epochs=1)

    names = ["floor", *feeds]
    with stack:
        for kind, reps in (("input", cfg["repeats"]), ("train", cfg["train_repeats"])):
            for r in range(reps):
                for path in names[r % len(names) :] + names[: r % len(names)]:
                    with dataset(path, True) as ds:
                        seconds, count = (input_pass if kind == "input" else train_pass)(ds)
                    out["paths"][path].setdefault(kind, []).append({"seconds": seconds, "images": count})
                    print(
                        f"[training] {kind:5s} {path:9s} {count} images {seconds:6.1f}s "
                        f"{count / seconds:7.1f} img/s (load {load_average()})",
                        flush=True,
                    )
    return out


# ---- part 5: the frozen phase from cached features against from images ---------------------------

HEAD_NAME = "frozen_head"


def run_head(files: list[str], epochs: int = 5) -> dict[str, Any]:
    """Part 5: ``train`` with ``head_input`` features and images, same data and epochs, in one child."""
    return run_child("frozen_head", {"files": files, "epochs": epochs})


def child_head(cfg: dict[str, Any]) -> dict[str, Any]:
    """One featurization pass alone, then the frozen phase from features and from images (wall times)."""
    import tempfile

    import keras
    from pyspark.sql import functions as F

    from image_transfer.api import featurize_images
    from image_transfer.training.train import TrainConfig, build_backbone, build_classifier, train

    spark = spark_session("bench frozen head")
    raw = spark.read.parquet(*cfg["files"])
    # A prepared dataset: a fifth of the images validation, by a hash of the path (so every class is in
    # both splits); the synthetic labels are not learnable by a random backbone: the two accuracies are
    # compared with each other, both near chance.
    df = raw.select(
        "path",
        "content",
        F.col("label_index").cast("string").alias("label"),
        "label_index",
        F.when(F.abs(F.hash("path")) % 5 == 0, "validation").otherwise("train").alias("split"),
        F.lit(None).cast("string").alias("error"),
    ).cache()
    n = df.count()
    config = TrainConfig(backbone="mobilenet_v2", weights="none", image_size=SIZE, epochs=cfg["epochs"], augment=False)
    out: dict[str, Any] = {"images": n, "epochs": cfg["epochs"], "batch_size": config.batch_size, "runs": {}}
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        # The backbone train builds (its seed: random weights, the same on every build), as a pre-trained
        # backbone is the same on every run: the featurization pass converts it for LiteRT, train's own
        # pass finds it converted (the cache is keyed by the network's content).
        keras.utils.set_random_seed(config.seed)
        backbone, preprocess, size = build_backbone("mobilenet_v2", weights="none", image_size=SIZE)
        model = build_classifier(backbone, preprocess, classes=CLASSES, size=size, dropout=0.2)
        from image_transfer.models.artifact import save_model

        save_model(model, f"{tmp}/embedder.keras", class_names=[str(i) for i in range(CLASSES)])
        # Warm, as the features path's own pass is (its workers, model and LiteRT conversion then ready):
        # one untimed pass first.
        featurize_images(df, f"{tmp}/embedder.keras").write.parquet(f"{tmp}/warmup.parquet")
        t0 = time.perf_counter()
        featurize_images(df, f"{tmp}/embedder.keras").write.parquet(f"{tmp}/features.parquet")
        out["featurize_seconds"] = time.perf_counter() - t0
        print(f"[frozen head] one featurization pass: {out['featurize_seconds']:.1f}s", flush=True)
        runs = {  # features_new_backbone: a backbone no run has converted (its seed differs): train converts it
            "features": replace(config, head_input="features"),
            "features_new_backbone": replace(config, head_input="features", seed=config.seed + 1),
            "images": replace(config, head_input="images"),
        }
        for kind, run_config in runs.items():
            t0 = time.perf_counter()
            result = train(df, replace(run_config, cache_dir=tmp), output_model=f"{tmp}/{kind}.keras")
            out["runs"][kind] = {
                "wall_seconds": time.perf_counter() - t0,
                "train_seconds": sum(e["train_seconds"] for e in result.epochs),
                "validation_accuracy": result.final_validation_accuracy,
                "features": result.features,
            }
            print(f"[frozen head] {kind}: {out['runs'][kind]['wall_seconds']:.1f}s (load {load_average()})", flush=True)
    feats, images = out["runs"]["features"], out["runs"]["images"]
    head_alone = feats["train_seconds"]
    out["features_over_featurize_plus_head"] = feats["wall_seconds"] / (out["featurize_seconds"] + head_alone)
    out["features_over_images"] = feats["wall_seconds"] / images["wall_seconds"]
    new = out["runs"]["features_new_backbone"]
    out["new_backbone_over_featurize_plus_head"] = new["wall_seconds"] / (
        out["featurize_seconds"] + new["train_seconds"]
    )
    return out
