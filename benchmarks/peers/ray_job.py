"""Peer job: batch image classification with Ray Data on one machine.

Usage (the peers' venv, see setup.sh):
  benchmarks/peers/.venv/bin/python benchmarks/peers/ray_job.py
      --model MODEL_DIR --output OUT_DIR (--parquet SHARD_DIR | --images DIR)
      [--cpus 2] [--actors 2] [--actor_cpus 0.5] [--batch_size 256]
      [--parquet_reader v1] [--read_blocks 0] [--repartition 0]

The shape of Ray's batch-inference guide ("End-to-end: Offline Batch
Inference"): read, then `map_batches` with a callable class on a fixed actor
pool (`compute=ActorPoolStrategy(size=N)`), so each actor loads the model
once in `__init__`, then `write_parquet`. The work per image is the
project's own (common.Classifier): the card's decoder, then TFLite on one
thread.

Inputs: --parquet, a folder of shards with columns id and image (encoded
bytes), as `python -m tools.make_shards` writes them; or --images, a folder
of image files (any depth), whose id is the file path. Output: Parquet files
with id, label (null for an image that did not decode) and confidence.

The defaults are tuned for 2 cores (benchmarks/README.md, "Peers"):
  * Two actors of half a CPU each. Ray Data gives map workers num_cpus=1
    unless told otherwise; two such actors take both logical CPUs, the read
    task never gets one, and the job hangs without a word. Logical CPUs only
    gate admission: half a CPU does not slow an actor down.
  * Parquet through Ray Data's v1 datasource, one read task (block) per file.
    Ray 2.60's default v2 datasource packs small files into buckets and takes
    override_num_blocks only as a hint: four 10 MB files became one block, so
    one actor did all the rows while the other idled.
"""

import os
import shutil
import sys
import time

# Before `import ray`: no usage-stats report (offline) and no progress bars.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
from benchmarks.peers import common  # pylint: disable=wrong-import-position

common.use_repo()

import ray  # pylint: disable=wrong-import-position


class RayClassifier:
  """One per actor: the model is loaded once, then called once per batch."""

  def __init__(self, model_dir):
    self._classify = common.Classifier(model_dir)

  def __call__(self, batch):
    labels, confidences = self._classify(batch["image"])
    return {"id": batch["id"], "label": labels, "confidence": confidences}


def parse_args(argv=None):
  parser = common.job_parser(__doc__)
  parser.add_argument("--cpus", type=int, default=2,
                      help="logical CPUs given to ray.init")
  parser.add_argument("--actors", type=int, default=2, help="actor pool size")
  parser.add_argument("--actor_cpus", type=float, default=0.5,
                      help="num_cpus reserved per actor")
  parser.add_argument("--batch_size", type=int, default=256)
  parser.add_argument("--read_blocks", type=int, default=0,
                      help="override_num_blocks for the read (0: Ray decides)")
  parser.add_argument("--repartition", type=int, default=0,
                      help="repartition the read into this many blocks (0: no)")
  parser.add_argument("--parquet_reader", choices=("v1", "v2"), default="v1",
                      help="Ray Data's Parquet datasource (v2 is Ray 2.60's "
                      "default; see above)")
  parser.add_argument("--object_store_mb", type=int, default=1024)
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  start = time.monotonic()
  model_dir = os.path.abspath(args.model)
  common.load_card(model_dir)  # a bad folder fails before Ray starts
  output = os.path.abspath(args.output)
  if os.path.exists(output):
    shutil.rmtree(output)

  # The object store cap only keeps Ray from reserving 30% of RAM; the peak
  # /dev/shm use measured was tens of MiB.
  ray.init(num_cpus=args.cpus, include_dashboard=False,
           object_store_memory=args.object_store_mb * 2**20,
           logging_level="WARNING")
  context = ray.data.DataContext.get_current()
  context.enable_progress_bars = False
  context.use_datasource_v2 = args.parquet_reader == "v2"
  started = time.monotonic()

  read_options = {}
  if args.read_blocks:
    read_options["override_num_blocks"] = args.read_blocks
  if args.parquet:
    # select_columns right after the read is pushed down into it (Ray 2.60
    # deprecates read_parquet's own columns= for this).
    dataset = ray.data.read_parquet(os.path.abspath(args.parquet),
                                    **read_options).select_columns(
                                        ["id", "image"])
  else:
    dataset = ray.data.read_binary_files(
        os.path.abspath(args.images), include_paths=True, **read_options)
    dataset = dataset.rename_columns({"path": "id", "bytes": "image"})
  if args.repartition:
    dataset = dataset.repartition(args.repartition)

  predictions = dataset.map_batches(
      RayClassifier,
      fn_constructor_kwargs={"model_dir": model_dir},
      compute=ray.data.ActorPoolStrategy(size=args.actors),
      num_cpus=args.actor_cpus,
      batch_size=args.batch_size,
      batch_format="numpy")
  predictions.write_parquet(output)
  finished = time.monotonic()
  ray.shutdown()

  common.report("ray", ray.__version__, {
      "cpus": args.cpus, "actors": args.actors, "actor_cpus": args.actor_cpus,
      "batch_size": args.batch_size, "read_blocks": args.read_blocks or "auto",
      "repartition": args.repartition, "parquet_reader": args.parquet_reader,
  }, (start, started, finished), common.count_inputs(args.parquet,
                                                     args.images), output)


if __name__ == "__main__":
  main()
