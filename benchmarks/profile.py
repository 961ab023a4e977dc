"""Where P's time goes: each stage alone, against the whole pipeline.

Usage:
  python -m benchmarks.profile --workload W1 [--work /tmp/bench]
      [--fashion_model DIR] [--flowers_model DIR] [--w4_model DIR]

The stages run in this process, one after the other, with the pipeline's own
DoFns and engine on one thread: read, decode, inference, format (Arrow
tables) and write (Parquet). Their CPU time is what the work itself costs.
Then P runs as a user runs it (python -m beam_jobs.predict, the settings of
benchmarks/throughput.py), and its whole process tree's CPU time is taken
from the kernel. What P spends beyond the stages is Beam (start-up, bundle
and element handling, pickling between stages, shard renames); what its
cores spend idle is wall time not covered by CPU on any core.
"""

import argparse
import os
import resource
import sys
import tempfile
import time

from benchmarks import throughput

STAGES = ("read", "decode", "inference", "format", "write")


class Clock:
  """Adds up this process's CPU time per stage."""

  def __init__(self):
    self.seconds = dict.fromkeys(STAGES, 0.0)

  def run(self, stage, function, *args):
    started = time.process_time()
    result = function(*args)
    self.seconds[stage] += time.process_time() - started
    return result


def _main_outputs(results):
  """A DoFn's main outputs as a list; tagged (error) outputs are dropped."""
  import apache_beam as beam  # pylint: disable=import-outside-toplevel
  return [r for r in results if not isinstance(r, beam.pvalue.TaggedOutput)]


def stage_seconds(folder, model_dir, batch_size, max_images=0):
  """CPU seconds per stage over the workload (its first `max_images` images
  when that is set), and the image count."""
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  from beam_jobs import outputs, sources  # pylint: disable=import-outside-toplevel
  from beam_jobs.inference import ImageClassifierHandler  # pylint: disable=import-outside-toplevel
  from beam_jobs.preprocess import DecodeImages  # pylint: disable=import-outside-toplevel
  from model import card as card_lib  # pylint: disable=import-outside-toplevel

  card = card_lib.load_card(model_dir)
  kind, items = throughput.list_inputs(folder)
  if kind == "parquet":
    from beam_jobs import row_groups  # pylint: disable=import-outside-toplevel
    reader = sources._ReadParquetItem(  # pylint: disable=protected-access
        "image", "id", "label", batch_size, card.input_shape)
    work = [item for shard in items for item in row_groups.plan_items(
        shard, row_groups.footer_rows(shard))]
  else:
    if max_images:
      items = items[::max(1, len(items) // max_images)][:max_images]
    reader = sources._ReadFileGroup(folder, card.class_names)  # pylint: disable=protected-access
    work = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
  reader.setup()
  decoder = DecodeImages(card)
  handler = ImageClassifierHandler(model_dir, "tflite", threads=1)
  engine = handler.load_model()
  formatter = outputs.FormatPredictions(card, "tflite", 3, False)
  formatter.setup()
  clock = Clock()
  # A warm-up batch outside the clock: tracing TensorFlow's decoder graph
  # and sizing the interpreter happen once per worker, not per image.
  for batch in _main_outputs(reader.process(work[0])):
    for decoded in _main_outputs(decoder.process(batch)):
      handler.run_inference(decoded, engine)
    break
  images = 0
  with tempfile.TemporaryDirectory() as scratch:
    writer = pq.ParquetWriter(os.path.join(scratch, "out.parquet"),
                              outputs.predictions_schema())
    for element in work:
      for batch in clock.run("read", lambda e: _main_outputs(reader.process(e)),
                             element):
        for decoded in clock.run("decode", lambda b: _main_outputs(
            decoder.process(b)), batch):
          for result in clock.run("inference", handler.run_inference,
                                  decoded, engine):
            for table in clock.run("format", lambda r: _main_outputs(
                formatter.process(r)), result):
              clock.run("write", writer.write_table, table)
              images += table.num_rows
      if max_images and images >= max_images:
        break
    clock.run("write", writer.close)
  return clock.seconds, images


def pipeline_seconds(folder, model_dir, out_dir):
  """(wall seconds, CPU seconds of P's whole process tree, images)."""
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  result = throughput.run_system("P", folder, model_dir, out_dir, 0,
                                 throughput.P_FLAGS)
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
  return result["wall_s"], cpu, result["images"]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workload", default="W1", choices=["W1", "W2", "W3", "W4"])
  parser.add_argument("--work", default="/tmp/bench")
  parser.add_argument("--fashion_model", default=None)
  parser.add_argument("--flowers_model", default=None)
  parser.add_argument("--w4_model", default=None)
  parser.add_argument("--w1_images", type=int, default=300_000)
  parser.add_argument("--w4_images", type=int, default=3_433)
  parser.add_argument("--shared_data", default=throughput.SHARED)
  parser.add_argument("--w4_decoder", default="tensorflow",
                      choices=("tensorflow", "pillow"))
  parser.add_argument("--batch_size", type=int, default=throughput.BATCH)
  args = parser.parse_args(argv)
  defaults = throughput.parse_args([
      "--work", args.work, "--shared_data", args.shared_data, "--w1_images",
      str(args.w1_images), "--w4_images", str(args.w4_images)])
  defaults.workloads = [args.workload]
  defaults.fashion_model = args.fashion_model
  defaults.flowers_model = args.flowers_model
  defaults.w4_model, defaults.w4_decoder = args.w4_model, args.w4_decoder
  folder, model_dir = throughput.prepare(defaults)[args.workload]

  stages, images = stage_seconds(folder, model_dir, args.batch_size)
  wall, cpu, p_images = pipeline_seconds(
      folder, model_dir, os.path.join(args.work, "out", "profile"))
  if p_images != images:
    sys.exit(f"P classified {p_images} images, the stages {images}")
  cores = os.cpu_count()
  rows = [(stage, seconds) for stage, seconds in stages.items()]
  rows.append(("Beam and start-up (P's CPU beyond the stages)",
               max(0.0, cpu - sum(stages.values()))))
  rows.append(("idle cores (cores x wall beyond P's CPU)",
               max(0.0, cores * wall - cpu)))
  total = sum(seconds for _, seconds in rows)
  print(f"{args.workload}: {images} images; P took {wall:.1f} s wall on "
        f"{cores} cores, {cpu:.1f} s of CPU\n")
  print("| part | core-seconds | µs per image | share |")
  print("| --- | --- | --- | --- |")
  for name, seconds in rows:
    print(f"| {name} | {seconds:.1f} | {seconds / images * 1e6:.1f} | "
          f"{seconds / total:.0%} |")
  print(f"| total (cores x wall) | {total:.1f} | {total / images * 1e6:.1f} | "
        "100% |")


if __name__ == "__main__":
  main()
