"""The pipeline's stages one after the other in this process, each timed.

The pipeline's own DoFns and engine on one thread: read, decode, inference,
format (Arrow tables) and write (Parquet). Their CPU time is what the work
itself costs; benchmarks.profile sets it against P's, and
benchmarks.throughput takes the decoder's and the model's as the machine's
physical limit.
"""

import glob
import os
import tempfile
import time


def list_inputs(folder):
  """(kind, items) where items are shard paths or image paths, sorted."""
  shards = sorted(glob.glob(os.path.join(folder, "*.parquet")))
  if shards:
    return "parquet", shards
  return "files", sorted(glob.glob(os.path.join(folder, "*", "*")))


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
  from beam_jobs import outputs  # pylint: disable=import-outside-toplevel
  from beam_jobs.sources import images, parquet  # pylint: disable=import-outside-toplevel
  from beam_jobs.inference import ImageClassifierHandler  # pylint: disable=import-outside-toplevel
  from beam_jobs.preprocess import DecodeImages  # pylint: disable=import-outside-toplevel
  from model import card as card_lib  # pylint: disable=import-outside-toplevel

  card = card_lib.load_card(model_dir)
  kind, items = list_inputs(folder)
  if kind == "parquet":
    from beam_jobs.sources import row_groups  # pylint: disable=import-outside-toplevel
    reader = parquet._ReadParquetItem(  # pylint: disable=protected-access
        "image", "id", "label", batch_size, card.input_shape)
    work = [row_groups.RowSelection(item) for shard in items
            for item in row_groups.plan_items(
                shard, row_groups.footer_rows(shard))]
  else:
    if max_images:
      items = items[::max(1, len(items) // max_images)][:max_images]
    reader = images._ReadFileGroup()  # pylint: disable=protected-access
    names = frozenset(card.class_names)
    work = [images.folder_refs(items[i:i + batch_size], folder, names)
            for i in range(0, len(items), batch_size)]
  reader.setup()
  decoder = DecodeImages(card)
  handler = ImageClassifierHandler(model_dir, card.default_engine, threads=1)
  engine = handler.load_model()
  formatter = outputs.FormatPredictions(card, card.default_engine, 3, False)
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
