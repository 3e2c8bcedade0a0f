# Databricks notebook source
# MAGIC %md
# MAGIC # Score and featurize a folder of images
# MAGIC
# MAGIC Classifies every image under a folder with a trained model, shows the least confident predictions,
# MAGIC then embeds the images and uses the embeddings with MLlib (a logistic regression on them, and the
# MAGIC nearest neighbours of an image). The model is shipped once, loaded and traced once per executor
# MAGIC Python worker; every call below returns a lazy DataFrame.
# MAGIC
# MAGIC Parameters (widgets): `images` (a folder, e.g. a Unity Catalog volume path), `model` (a `.keras` file,
# MAGIC SavedModel directory or MLflow URI; default the registered model's `@champion`, which training promotes),
# MAGIC `output` (optional: where to write the predictions as Parquet).
# MAGIC Outside Databricks the same cells run on local Spark with `IMAGE_TRANSFER_IMAGES`, `IMAGE_TRANSFER_MODEL`
# MAGIC and `IMAGE_TRANSFER_OUTPUT` from the environment: `python notebooks/score_and_featurize.py` uses the active
# MAGIC SparkSession, else starts a local one (`IMAGE_TRANSFER_MASTER`, default `local[*]`) whose workers run this
# MAGIC interpreter (`PYSPARK_PYTHON` defaults to it).

# COMMAND ----------

import os
import sys

from pyspark.sql import functions as F

try:
    spark  # noqa: B018 - Databricks' session: used as-is
except NameError:  # a local run: the active session, else local Spark whose workers run this interpreter
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    spark = SparkSession.getActiveSession() or (
        SparkSession.builder.master(os.environ.get("IMAGE_TRANSFER_MASTER", "local[*]"))
        .appName("score_and_featurize")
        .getOrCreate()
    )


def widget(name: str, default: str) -> str:
    """A notebook parameter: a Databricks widget, or an environment variable when run elsewhere."""
    try:
        dbutils.widgets.text(name, default)  # noqa: F821 - defined in Databricks notebooks
        return dbutils.widgets.get(name)  # noqa: F821
    except NameError:
        return os.environ.get(f"IMAGE_TRANSFER_{name.upper()}", default)


try:
    display  # noqa: B018 - Databricks' rich table view
except NameError:

    def display(df) -> None:  # noqa: ANN001 - a plain table outside Databricks
        df.show(20, truncate=80)


images_dir = widget("images", "/Volumes/main/image_transfer/data/images")
model_path = widget("model", "models:/main.image_transfer.image_classifier@champion")  # what training promotes
output = widget("output", "")

# COMMAND ----------

# MAGIC %md
# MAGIC ## Score: the least confident predictions first

# COMMAND ----------

from image_transfer import featurize_images, read_images, score_images, scoring_run, write_output  # noqa: E402

images = read_images(spark, images_dir)
scored = score_images(images, model_path, top_k=3)
run = scoring_run(scored)  # the handle: statistics after an action
with run.settings():  # the scoring pass with the call's Arrow batches (the session's own afterwards)
    scored = scored.cache()  # several looks below, one scoring pass
    display(scored.orderBy(F.col("probability").asc_nulls_first()).limit(10))

# COMMAND ----------

totals = run.totals()
print(f"{totals['rows']} images, {totals['rows_failed']} failed, model {run.model_version} ({run.shipped})")
for worker, counts in run.workers().items():
    print(f"  {worker}: {counts['rows']} rows, {counts['model_loads']} model loads, {counts['traces']} traces")
display(scored.where(F.col("error").isNotNull()).select("path", "error"))
if output:  # atomically, one writer at a time; replaces only an earlier scored output
    write_output(scored, output, command="score")

# COMMAND ----------

# MAGIC %md
# MAGIC ## Featurize, then use the embeddings with MLlib
# MAGIC The label of an image is its folder's name here; use your own labels the same way.

# COMMAND ----------

from pyspark.ml.classification import LogisticRegression  # noqa: E402
from pyspark.ml.feature import BucketedRandomProjectionLSH, StringIndexer  # noqa: E402
from pyspark.ml.functions import array_to_vector  # noqa: E402

embedded = featurize_images(images, model_path)
with scoring_run(embedded).settings():  # the scoring pass, cached, with the call's Arrow batches
    features = (
        embedded.where(F.col("error").isNull())
        .select(
            "path",
            F.element_at(F.split("path", "/"), -2).alias("label"),
            array_to_vector("embedding").alias("features"),
        )
        .cache()
    )
    features.count()
indexed = StringIndexer(inputCol="label", outputCol="label_index").fit(features).transform(features)
train, test = indexed.randomSplit([0.8, 0.2], seed=7)
classifier = LogisticRegression(featuresCol="features", labelCol="label_index", maxIter=50).fit(train)
accuracy = classifier.evaluate(test).accuracy
print(f"logistic regression on the embeddings: accuracy {accuracy:.3f} on {test.count()} held-out images")

# COMMAND ----------

lsh = BucketedRandomProjectionLSH(inputCol="features", outputCol="hashes", bucketLength=4.0, numHashTables=3)
index = lsh.fit(features)
query = features.orderBy("path").first()
neighbours = index.approxNearestNeighbors(features, query["features"], 5).select("path", "label", "distCol")
print(f"nearest neighbours of {query['path']}:")
display(neighbours)
