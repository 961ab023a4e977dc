"""Peer job: batch image classification with PySpark on one machine.

Usage (the peers' venv, see setup.sh):
  benchmarks/peers/.venv/bin/python benchmarks/peers/spark_job.py
      --model MODEL_DIR --output OUT_DIR (--parquet SHARD_DIR | --images DIR)
      [--master local[2]] [--partitions 2] [--arrow_batch 2048]
      [--batch_size 256]

The path Spark's docs give for batch inference: a DataFrame read, then
`pyspark.ml.functions.predict_batch_udf`, whose `make_predict_fn` runs once
per Python worker (the returned function is cached in the worker, which
Spark reuses across tasks: spark.python.worker.reuse), then a Parquet write.
The work per image is the project's own (common.Classifier): the card's
decoder, then TFLite on one thread.

Inputs: --parquet, a folder of shards with columns id and image (encoded
bytes), as `python -m tools.make_shards` writes them; or --images, a folder
of image files read with the binaryFile source, whose id is the file URI
(file:/...). Output: Parquet files with id, label (null for an image that did
not decode) and confidence.

The defaults are tuned for 2 cores (benchmarks/README.md, "Peers"):
  * coalesce(2): the file source packs small files into splits of up to
    spark.sql.files.maxPartitionBytes, counting openCostInBytes (4 MB) per
    file, so 10,299 small JPEGs become over 300 tasks, each a round trip to a
    Python worker. coalesce merges partitions without a shuffle.
  * Arrow batches of 2,048 rows (spark.sql.execution.arrow.maxRecordsPerBatch,
    default 10,000): 512 to 10,000 were within noise; 2,048 bounds a batch of
    large photos; predict_batch_udf slices it into --batch_size for the model.

Needs Java 17 or 21 (PySpark 4). The Python workers run this interpreter:
without PYSPARK_PYTHON they would start the first `python3` on PATH, which
lacks the venv's packages.
"""

import os
import sys
import time

# Workers must run this interpreter (the venv's); set before Spark starts.
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
# One machine, offline: bind to loopback.
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
from benchmarks.peers import common  # pylint: disable=wrong-import-position

common.use_repo()

# pylint: disable=wrong-import-position
from pyspark.ml.functions import predict_batch_udf
from pyspark.sql import SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T
# pylint: enable=wrong-import-position


def make_predict_fn_for(model_dir):
  """A make_predict_fn for predict_batch_udf; it runs in the Python worker,
  once per worker process."""

  def make_predict_fn():
    classify = common.Classifier(model_dir)

    def predict(images):
      # images: a 1-D object array of encoded bytes (one batch_size slice).
      labels, confidences = classify(images)
      return {"label": labels, "confidence": confidences}

    return predict

  return make_predict_fn


def parse_args(argv=None):
  parser = common.job_parser(__doc__)
  parser.add_argument("--master", default="local[2]")
  parser.add_argument("--partitions", type=int, default=2,
                      help="coalesce the input to this many partitions "
                      "(0: keep Spark's split)")
  parser.add_argument("--arrow_batch", type=int, default=2048,
                      help="spark.sql.execution.arrow.maxRecordsPerBatch")
  parser.add_argument("--batch_size", type=int, default=256,
                      help="predict_batch_udf batch_size (model batch)")
  parser.add_argument("--driver_memory", default="1g")
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  start = time.monotonic()
  model_dir = os.path.abspath(args.model)
  common.load_card(model_dir)  # a bad folder fails before the JVM starts
  output = os.path.abspath(args.output)

  spark = (
      SparkSession.builder.master(args.master)
      .appName("peer-spark-batch-inference")
      .config("spark.driver.memory", args.driver_memory)
      .config("spark.driver.bindAddress", "127.0.0.1")
      .config("spark.driver.host", "127.0.0.1")
      .config("spark.ui.enabled", "false")
      .config("spark.ui.showConsoleProgress", "false")
      .config("spark.sql.execution.arrow.maxRecordsPerBatch",
              str(args.arrow_batch))
      # The default, stated: predict_batch_udf's model cache relies on it.
      .config("spark.python.worker.reuse", "true")
      .config("spark.sql.shuffle.partitions", "2")
      .getOrCreate())
  spark.sparkContext.setLogLevel("ERROR")
  started = time.monotonic()

  if args.parquet:
    frame = spark.read.parquet(os.path.abspath(args.parquet)).select(
        "id", "image")
  else:
    frame = (spark.read.format("binaryFile")
             .option("recursiveFileLookup", "true")
             .load(os.path.abspath(args.images))
             .select(F.col("path").alias("id"), F.col("content").alias("image")))
  input_partitions = frame.rdd.getNumPartitions()
  if args.partitions:
    frame = frame.coalesce(args.partitions)

  classify = predict_batch_udf(
      make_predict_fn_for(model_dir),
      return_type=T.StructType([
          T.StructField("label", T.StringType()),
          T.StructField("confidence", T.FloatType()),
      ]),
      batch_size=args.batch_size)
  # One ArrowEvalPython node in the plan: the UDF runs once per row although
  # two fields of its struct are selected.
  predictions = (frame.withColumn("prediction", classify("image"))
                 .select("id", F.col("prediction.label").alias("label"),
                         F.col("prediction.confidence").alias("confidence")))
  predictions.write.mode("overwrite").parquet(output)
  finished = time.monotonic()
  version = spark.version
  spark.stop()

  common.report("spark", version, {
      "master": args.master, "input_partitions": input_partitions,
      "partitions": args.partitions or input_partitions,
      "arrow_batch": args.arrow_batch, "batch_size": args.batch_size,
  }, (start, started, finished), common.count_inputs(args.parquet,
                                                     args.images), output)


if __name__ == "__main__":
  main()
