"""The pipeline graph: read, preprocess, run inference, write.

`build_pipeline` only wires stages; each stage lives in the module named for
it. Every input ends either as a prediction row or as an error row.
"""

import apache_beam as beam
from apache_beam.ml.inference.base import RunInference

from beam_jobs import outputs
from beam_jobs.config import PredictConfig
from beam_jobs.inference import ImageClassifierHandler
from beam_jobs.contracts import ERROR_ROWS
from beam_jobs.contracts import ERRORS
from beam_jobs.contracts import PREDICTIONS
from beam_jobs.preprocess import Preprocess
from beam_jobs.sources.images import ReadImageFiles
from beam_jobs.sources.lists import ReadInputList
from beam_jobs.sources.parquet import ReadParquetImages
from beam_jobs.sources.skip_existing import SkipExisting
from model.card import ModelCard


def read_inputs(pipeline, config: PredictConfig, card: ModelCard,
                skip_files=(), skip_rows=None):
  # With nothing kept from before there is nothing to skip, and no join.
  skip = SkipExisting(list(skip_files), card.model_id, skip_rows) if (
      config.skip_existing and skip_files) else None
  # The run's own output is never an input, even inside the input folder.
  exclude = config.output
  if config.input_list:
    return pipeline | "ReadInputList" >> ReadInputList(
        config.input_list, config.uri_column, config.id_column,
        config.label_column, config.batch_size, skip, exclude=exclude)
  if config.input_format == "parquet":
    return pipeline | "ReadParquetImages" >> ReadParquetImages(
        config.input, card.input_shape, config.image_column, config.id_column,
        config.label_column, config.batch_size, skip, exclude=exclude)
  return pipeline | "ReadImageFiles" >> ReadImageFiles(
      config.input, card.class_names, config.batch_size, skip,
      exclude=exclude)


def counts_duplicate_ids(config: PredictConfig) -> bool:
  """Whether the run counts repeated ids: file paths and SHARD#ROW ids are
  unique by construction; ids from a column or a list are data, and repeats
  are counted for the manifest unless --no_duplicate_count."""
  return config.count_duplicate_ids and bool(
      config.input_list or (config.input_format == "parquet" and
                            config.id_column))


def build_pipeline(pipeline, config: PredictConfig, card: ModelCard,
                   run_id: str, skip_files=(), skip_rows=None,
                   progress=None) -> None:
  """Wires the graph; `run_id` names this run's output shards, and with
  --skip_existing `skip_files` are the earlier prediction shards kept
  (holding `skip_rows` rows, when known).

  With `progress` (a progress.ProgressReporter, for local runs) the
  predictions and the error rows are also counted for progress lines.
  """
  read = read_inputs(pipeline, config, card, skip_files, skip_rows)
  preprocessed = read.images | "Preprocess" >> Preprocess(
      card, config.max_image_pixels)
  handler = ImageClassifierHandler(config.model, config.engine,
                                   config.inference_threads,
                                   config.write_embeddings)
  results = preprocessed.images | "RunInference" >> RunInference(
      handler.with_no_batching())
  formatted = results | "FormatPredictions" >> beam.ParDo(
      outputs.FormatPredictions(card, config.engine, config.top_k,
                                config.write_probabilities)).with_outputs(
                                    ERRORS, main="tables")
  embedding_dimension = (card.embedding_dimension if config.write_embeddings
                         else None)
  _ = formatted.tables | "WritePredictions" >> outputs.WritePredictions(
      config.output, run_id, config.write_probabilities, embedding_dimension)
  errors = ((read.errors, preprocessed.errors, formatted.errors)
            | "CollectErrors" >> beam.Flatten())
  _ = errors | "WriteErrors" >> outputs.WriteErrors(config.output, run_id)
  if counts_duplicate_ids(config):
    _ = ((formatted.tables, errors)
         | "CountDuplicateIds" >> outputs.CountDuplicateIds())
  if progress is not None:
    _ = formatted.tables | "ProgressPredictions" >> beam.ParDo(
        progress.counter(PREDICTIONS))
    _ = errors | "ProgressErrors" >> beam.ParDo(
        progress.counter(ERROR_ROWS))
  if config.bigquery_table:
    _ = formatted.tables | "WritePredictionsToBigQuery" >> (
        outputs.WriteBigQuery(
            config.bigquery_table,
            outputs.predictions_schema(config.write_probabilities,
                                       embedding_dimension)))
    _ = errors | "WriteErrorsToBigQuery" >> outputs.WriteBigQuery(
        outputs.errors_table_spec(config.bigquery_table), outputs.ERRORS_SCHEMA)
