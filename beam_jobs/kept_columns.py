"""--skip_existing's kept shards and this run's new ones: the same columns.

A Parquet reader given predictions/ reads the first shard's columns alone,
and the manifest describes one set of columns, so a folder's prediction
shards must all have the columns a flag adds.
"""

from typing import Optional

import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from beam_jobs import outputs
from beam_jobs.output_lock import FolderError
from imagebatch import paths


# The columns a flag adds to the predictions.
_OPTIONAL_COLUMNS = {outputs.EMBEDDING_COLUMN: "--write_embeddings",
                     "probabilities": "--write_probabilities"}


def check(state, schema) -> None:
  """Refuses --skip_existing when a kept prediction shard of `state` (an
  output_folder.FolderState) lacks a column this run writes
  (--write_embeddings, --write_probabilities), or has one it does not
  write; only the shards' footers are read."""
  for entry in state.kept_predictions():
    path = paths.join(state.output, entry["name"])
    try:
      with FileSystems.open(
          path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        kept = pq.ParquetFile(handle).schema_arrow
    except Exception:  # pylint: disable=broad-except
      continue  # Unreadable: the skip join reports it, as it always has.
    for column, flag in _OPTIONAL_COLUMNS.items():
      problem = _column_problem(column, flag, kept, schema)
      if problem:
        what, fix = problem
        raise FolderError(
            f"--skip_existing: the predictions kept in {state.output} "
            f"({paths.printable(entry['name'])}) {what}, and one folder's "
            f"shards must all have the same columns: {fix}pass --overwrite "
            "to classify everything again, or choose another folder")


def _column_problem(column: str, flag: str, kept, schema) -> Optional[tuple]:
  """How a kept shard's schema `kept` differs from this run's on `column`,
  and the flag that keeps the shards, or None."""
  here, there = column in schema.names, column in kept.names
  if here and not there:
    return (f"have no {column} column (written without {flag})",
            f"leave out {flag}, ")
  if there and not here:
    return (f"have the {column} column (written with {flag})",
            f"pass {flag} as that run did, ")
  if here and kept.field(column).type != schema.field(column).type:
    return (f"hold {column} as {kept.field(column).type}, not "
            f"{schema.field(column).type}", "")
  return None
