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
from apache_beam.io.filesystems import FileSystems

from beam_jobs import records
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
# The two kinds of shard, each in a folder of its name in the output
# (OUTPUT/predictions/predictions-RUN-SSSSS-of-NNNNN.parquet), so that a
# Parquet reader pointed at a kind's folder reads that table alone.
KINDS = (PREDICTIONS_PREFIX, ERRORS_PREFIX)
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


def shard_glob(output: str, kind: str) -> str:
  """A kind's shards in the output: OUTPUT/KIND/KIND-*.parquet."""
  return join(join(output, kind), f"{kind}-*{PARQUET_SUFFIX}")


def legacy_shard_glob(output: str, kind: str) -> str:
  """A kind's shards as versions before the kinds' folders wrote them, in
  the output folder itself."""
  return join(output, f"{kind}-*{PARQUET_SUFFIX}")


def shard_prefix(output: str, kind: str, run_id: str) -> str:
  """The path a run's shards of a kind start with. Beam's sink stages them
  beside it, in KIND/beam-temp-KIND-RUN-*, and renames them at the end."""
  return join(join(output, kind), f"{kind}-{run_id}")


class WritePredictions(beam.PTransform):
  """Arrow tables to `predictions/predictions-RUN-SSSSS-of-NNNNN.parquet`
  in the output."""

  def __init__(self, output: str, run_id: str, write_probabilities: bool,
               embedding_dimension: Optional[int] = None):
    super().__init__()
    self._prefix = shard_prefix(output, PREDICTIONS_PREFIX, run_id)
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
  """Error rows to `errors/errors-RUN-SSSSS-of-NNNNN.parquet` in the
  output."""

  def __init__(self, output: str, run_id: str):
    super().__init__()
    self._prefix = shard_prefix(output, ERRORS_PREFIX, run_id)

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


# What a reader may rely on in a manifest: the fields this tool writes (see
# beam_jobs/predict.py and output_folder.plan_commit), each checked when
# present. `files` entries are {"name", "rows"}; a name that is not one of
# our shard names is ignored by output_folder, never read nor deleted.
_COUNT = int
_ROWS_BY_KIND = records.MapOf(_COUNT)
MANIFEST_SCHEMA = records.Fields(
    manifest_version=int,
    run_id=str,
    model_id=str,
    model=records.Fields(model_id=str, architecture=(str, records.NONE),
                         input_shape=records.ListOf(int), color_mode=str,
                         classes=int),
    class_names=records.ListOf(str),
    arguments=records.MapOf(records.SCALAR),
    beam_args=records.ListOf(str),
    counts=records.MapOf(_COUNT),
    true_labels=records.MapOf((_COUNT, str, bool, records.NONE)),
    # null: not counted (--no_duplicate_count).
    duplicate_ids=(_COUNT, records.NONE),
    elapsed_seconds=float,
    images_per_second=(float, records.NONE),
    finished_at=str,
    files=records.MapOf(records.ListOf(records.Fields(
        name=str, rows=(_COUNT, records.NONE)))),
    totals=_ROWS_BY_KIND,
    written=_ROWS_BY_KIND,
    retired=records.ListOf(str),
    others=records.ListOf(str),
    accounted=bool,
    embedding=(records.NONE, records.Fields(
        column=str, dimension=int, type=str, duckdb_cast=str,
        layer=(str, records.NONE), chosen=(str, records.NONE))),
)


def read_manifest(output: str) -> Optional[dict]:
  """The folder's manifest, None when it has none.

  Raises ManifestError, naming the file, when `_run.json` is not a regular
  file, is empty, too large or too deeply nested, not JSON, not an object,
  or has a field of a type this tool never writes there: a damaged
  manifest tells nothing about the folder (beam_jobs/records.py).
  """
  path = manifest_path(output)
  try:
    data = records.read_bytes(path, MAX_MANIFEST_BYTES)
    if data is None:
      return None
    return records.check(records.parse(data, path), MANIFEST_SCHEMA, path)
  except records.RecordError as error:
    raise ManifestError(str(error)) from None
