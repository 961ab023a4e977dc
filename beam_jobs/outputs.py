"""Outputs: the Parquet schemas, row formatting, the sinks and the manifest.

Predictions are formatted a batch at a time into Arrow tables and written
with Beam's Parquet sink, which writes to a temporary folder and renames on
success: a failed run leaves no half-written visible files.
"""

import json
import os
from typing import Optional

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from beam_jobs.contracts import DUPLICATE_IDS
from beam_jobs.contracts import ERROR_ROWS
from beam_jobs.contracts import ERRORS
from beam_jobs.contracts import LABELLED
from beam_jobs.contracts import PREDICTIONS
from beam_jobs.contracts import UNMATCHED_LABELS
from beam_jobs.contracts import BatchResult
from beam_jobs.contracts import LabelMatcher
from beam_jobs.contracts import counter
from beam_jobs.contracts import id_bucket
from model.card import ModelCard
from imagebatch.paths import is_remote
from imagebatch.paths import join

PREDICTIONS_PREFIX = "predictions"
ERRORS_PREFIX = "errors"
MANIFEST_FILE = "_run.json"
# A manifest lists one entry per shard; this bounds what a reader accepts.
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
PARQUET_SUFFIX = ".parquet"

TOP_K_TYPE = pa.list_(
    pa.struct([("label", pa.string()), ("confidence", pa.float32())]))
ERRORS_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("source", pa.string()),
    ("stage", pa.string()),
    ("error", pa.string()),
])


# The embedding column: one fixed-size list of float32 per row, D values as
# the card says (the manifest records D). DuckDB reads it as FLOAT[];
# `embedding::FLOAT[D]` makes it DuckDB's fixed-size array.
EMBEDDING_COLUMN = "embedding"


def embedding_type(dimension: int) -> pa.DataType:
  return pa.list_(pa.float32(), dimension)


def predictions_schema(write_probabilities: bool = False,
                       embedding_dimension: Optional[int] = None
                       ) -> pa.Schema:
  fields = [
      ("id", pa.string()),
      ("source", pa.string()),
      ("label", pa.string()),
      ("label_index", pa.int32()),
      ("confidence", pa.float32()),
      ("top_k", TOP_K_TYPE),
      ("true_label", pa.string()),
      ("source_label", pa.string()),
      ("model_id", pa.string()),
      ("engine", pa.string()),
  ]
  if write_probabilities:
    fields.append(("probabilities", pa.list_(pa.float32())))
  if embedding_dimension:
    fields.append((EMBEDDING_COLUMN, embedding_type(embedding_dimension)))
  return pa.schema(fields)


def predictions_table(ids, sources, true_labels, probabilities: np.ndarray,
                      class_names: list, top_k: int, model_id: str,
                      engine: str, write_probabilities: bool,
                      source_labels=None,
                      embeddings: Optional[np.ndarray] = None) -> pa.Table:
  """Formats a batch of probability vectors as prediction rows.

  `true_labels` are class names (or None); `source_labels` the labels as the
  inputs gave them, by default the same. `embeddings` (N, D), when given,
  become the embedding column.
  """
  rows, num_classes = probabilities.shape
  k = min(top_k, num_classes)
  # A stable sort keeps argmax's tie-break: the lowest class index wins.
  order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
  confidences = np.take_along_axis(probabilities, order, axis=1)
  names = pa.array(class_names, pa.string())
  top_k_values = pa.StructArray.from_arrays(
      [names.take(pa.array(order.ravel())),
       pa.array(confidences.ravel(), pa.float32())],
      names=["label", "confidence"])
  offsets = pa.array(np.arange(0, rows * k + 1, k, dtype=np.int32))
  columns = [
      pa.array(ids, pa.string()),
      pa.array(sources, pa.string()),
      names.take(pa.array(order[:, 0])),
      pa.array(order[:, 0].astype(np.int32)),
      pa.array(confidences[:, 0], pa.float32()),
      pa.ListArray.from_arrays(offsets, top_k_values).cast(TOP_K_TYPE),
      pa.array(true_labels, pa.string()),
      pa.array(true_labels if source_labels is None else source_labels,
               pa.string()),
      pa.array([model_id] * rows, pa.string()),
      pa.array([engine] * rows, pa.string()),
  ]
  if write_probabilities:
    flat = pa.array(probabilities.ravel(), pa.float32())
    offsets = pa.array(np.arange(0, rows * num_classes + 1, num_classes,
                                 dtype=np.int32))
    columns.append(pa.ListArray.from_arrays(offsets, flat))
  dimension = None
  if embeddings is not None:
    dimension = int(embeddings.shape[1])
    columns.append(pa.FixedSizeListArray.from_arrays(
        pa.array(np.ascontiguousarray(embeddings, np.float32).ravel(),
                 pa.float32()), dimension))
  return pa.Table.from_arrays(
      columns, schema=predictions_schema(write_probabilities, dimension))


class FormatPredictions(beam.DoFn):
  """Turns each inference result into one Arrow table of prediction rows.

  Given labels are matched to the card's class names here, where every
  prediction passes, so `true_label` is always a class name or null and the
  label counters add up with the predictions.
  """

  def __init__(self, card: ModelCard, engine: str, top_k: int,
               write_probabilities: bool):
    self._class_names = list(card.class_names)
    self._model_id = card.model_id
    self._engine = engine
    self._top_k = top_k
    self._write_probabilities = write_probabilities
    self._matcher = LabelMatcher(self._class_names)
    self._predictions = counter(PREDICTIONS)
    self._labelled = counter(LABELLED)
    self._unmatched = counter(UNMATCHED_LABELS)

  def process(self, result: BatchResult):
    for row in result.errors:
      yield beam.pvalue.TaggedOutput(ERRORS, row)
    batch = result.batch
    if not len(batch):
      return
    self._predictions.inc(len(batch))
    true_labels, given, labelled, unmatched = self._matcher.match_all(
        batch.true_labels)
    if labelled:
      self._labelled.inc(labelled)
    if unmatched:
      self._unmatched.inc(unmatched)
    yield predictions_table(batch.ids, batch.sources, true_labels,
                            result.probabilities, self._class_names,
                            self._top_k, self._model_id, self._engine,
                            self._write_probabilities, source_labels=given,
                            embeddings=result.embeddings)


def _count_error(row: dict) -> dict:
  counter(ERROR_ROWS).inc()
  return row


# Ids are counted in this many groups by hash: each batch sends one list per
# group instead of one element per id, and no worker holds every id.
ID_GROUPS = 64


def _id_groups(ids: list):
  groups = {}
  for id_ in ids:
    groups.setdefault(id_bucket(id_, ID_GROUPS), []).append(id_)
  return groups.items()


def _table_id_groups(table: pa.Table):
  return _id_groups(table.column("id").to_pylist())


def _error_id_groups(row: dict):
  return _id_groups([row["id"]])


def _count_repeats(group_and_lists) -> None:
  _, lists = group_and_lists
  seen, repeats = set(), 0
  for ids in lists:
    for id_ in ids:
      if id_ in seen:
        repeats += 1
      else:
        seen.add(id_)
  if repeats:
    counter(DUPLICATE_IDS).inc(repeats)


class CountDuplicateIds(beam.PTransform):
  """Counts rows, predictions and errors together, whose id an earlier row
  had (the counter DUPLICATE_IDS); writes nothing."""

  def expand(self, tables_and_errors):
    tables, errors = tables_and_errors
    return (
        (tables | "PredictionIds" >> beam.FlatMap(_table_id_groups),
         errors | "ErrorIds" >> beam.FlatMap(_error_id_groups))
        | "AllIds" >> beam.Flatten()
        | "GroupByHash" >> beam.GroupByKey()
        | "CountRepeats" >> beam.Map(_count_repeats))


def predictions_glob(output: str) -> str:
  return join(output, f"{PREDICTIONS_PREFIX}-*{PARQUET_SUFFIX}")


def errors_glob(output: str) -> str:
  return join(output, f"{ERRORS_PREFIX}-*{PARQUET_SUFFIX}")


class WritePredictions(beam.PTransform):
  """Arrow tables to `predictions-RUN-SSSSS-of-NNNNN.parquet` in the output."""

  def __init__(self, output: str, run_id: str, write_probabilities: bool,
               embedding_dimension: Optional[int] = None):
    super().__init__()
    self._prefix = join(output, f"{PREDICTIONS_PREFIX}-{run_id}")
    # Each table (one batch, at most --batch_size rows) becomes a row group
    # of its own, so the writer holds one batch's embeddings at a time.
    self._schema = predictions_schema(write_probabilities,
                                      embedding_dimension)

  def expand(self, tables):
    return tables | "WriteParquet" >> beam.io.WriteToParquetBatched(
        file_path_prefix=self._prefix,
        schema=self._schema,
        file_name_suffix=PARQUET_SUFFIX)


class WriteErrors(beam.PTransform):
  """Error rows to `errors-RUN-SSSSS-of-NNNNN.parquet` in the output."""

  def __init__(self, output: str, run_id: str):
    super().__init__()
    self._prefix = join(output, f"{ERRORS_PREFIX}-{run_id}")

  def expand(self, rows):
    return (
        rows
        | "CountErrors" >> beam.Map(_count_error)
        | "WriteParquet" >> beam.io.WriteToParquet(
            file_path_prefix=self._prefix,
            schema=ERRORS_SCHEMA,
            file_name_suffix=PARQUET_SUFFIX))


_BIGQUERY_TYPES = {
    pa.string(): "STRING",
    pa.int32(): "INTEGER",
    pa.int64(): "INTEGER",
    pa.float32(): "FLOAT",
    pa.float64(): "FLOAT",
}


def _bigquery_field(field: pa.Field) -> dict:
  """One BigQuery field for one Arrow field; lists become REPEATED."""
  mode, arrow_type = "NULLABLE", field.type
  if pa.types.is_list(arrow_type) or pa.types.is_fixed_size_list(arrow_type):
    mode, arrow_type = "REPEATED", arrow_type.value_type
  if pa.types.is_struct(arrow_type):
    return {"name": field.name, "type": "RECORD", "mode": mode,
            "fields": [_bigquery_field(arrow_type.field(i))
                       for i in range(arrow_type.num_fields)]}
  return {"name": field.name, "type": _BIGQUERY_TYPES[arrow_type],
          "mode": mode}


def bigquery_schema(schema: pa.Schema) -> dict:
  """The BigQuery table schema with the same columns as a Parquet output."""
  return {"fields": [_bigquery_field(field) for field in schema]}


def errors_table_spec(table_spec: str) -> str:
  return table_spec + "_errors"


class WriteBigQuery(beam.PTransform):
  """Prediction tables or error rows to a BigQuery table, appending."""

  def __init__(self, table_spec: str, schema: pa.Schema):
    super().__init__()
    self._table_spec = table_spec
    self._schema = bigquery_schema(schema)

  def expand(self, elements):
    return (
        elements
        | "ToRows" >> beam.FlatMap(_table_rows)
        | "WriteToBigQuery" >> beam.io.WriteToBigQuery(
            self._table_spec,
            schema=self._schema,
            create_disposition=beam.io.BigQueryDisposition.CREATE_IF_NEEDED,
            write_disposition=beam.io.BigQueryDisposition.WRITE_APPEND))


def _table_rows(element):
  return element.to_pylist() if isinstance(element, pa.Table) else [element]


def embedding_manifest(card: ModelCard) -> dict:
  """The manifest's `embedding`: the column, its type and D, and the
  layer it came from."""
  dimension = card.embedding_dimension
  return {"column": EMBEDDING_COLUMN, "dimension": dimension,
          "type": str(embedding_type(dimension)),
          "duckdb_cast": f"{EMBEDDING_COLUMN}::FLOAT[{dimension}]",
          "layer": card.embedding["layer"],
          "chosen": card.embedding.get("chosen")}


def report_dir_for(output: str) -> str:
  """Where the next-step hints suggest a report of `output`: beside a local
  output folder; tools.report writes locally, so a gs:// one gets ./report."""
  return "report" if is_remote(output) else output.rstrip("/") + "-report"


class ManifestError(ValueError):
  """A `_run.json` that is not a manifest this tool wrote."""


def manifest_path(output: str) -> str:
  return join(output, MANIFEST_FILE)


def write_manifest(output: str, manifest: dict) -> str:
  """Writes `_run.json` atomically: readers see the old one or the new one.

  Locally the text goes to a temporary file, is flushed to disk and renamed
  over the manifest; a full disk fails the write and leaves the old one. On
  object stores (gs://) one object write is atomic by itself.
  """
  path = manifest_path(output)
  data = (json.dumps(manifest, indent=2, default=str) + "\n").encode()
  if is_remote(output):
    with FileSystems.create(path) as handle:
      handle.write(data)
    return path
  temporary = join(output, f"{MANIFEST_FILE}.{manifest['run_id']}.tmp")
  _write_local(temporary, data)
  _publish_local(temporary, path)
  return path


def _write_local(path: str, data: bytes) -> None:
  with open(path, "wb") as handle:
    handle.write(data)
    handle.flush()
    os.fsync(handle.fileno())


def _publish_local(temporary: str, path: str) -> None:
  """The commit point of a local run: one rename, atomic on POSIX."""
  os.replace(temporary, path)
  try:
    # The rename itself reaches the disk once the folder is synced.
    folder = os.open(os.path.dirname(path), os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(folder)
  except OSError:
    pass
  finally:
    os.close(folder)


def read_manifest(output: str) -> Optional[dict]:
  """The folder's manifest, None when it has none.

  Raises ManifestError, naming the file, when `_run.json` is empty, not JSON
  or not an object: a damaged manifest tells nothing about the folder.
  """
  path = manifest_path(output)
  try:
    if not FileSystems.exists(path):
      return None
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED
                         ) as handle:
      data = handle.read(MAX_MANIFEST_BYTES + 1)
  except (OSError, ValueError) as error:
    raise ManifestError(f"{path} cannot be read: {error}") from None
  if len(data) > MAX_MANIFEST_BYTES:
    raise ManifestError(f"{path} is larger than {MAX_MANIFEST_BYTES} bytes: "
                        "not a manifest this tool wrote")
  try:
    manifest = json.loads(data.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as error:
    what = "empty (0 bytes)" if not data else f"not valid JSON ({error})"
    raise ManifestError(f"{path} is {what}") from None
  if not isinstance(manifest, dict):
    raise ManifestError(f"{path} is not a JSON object")
  return manifest
