"""ReadInputList: the images that list files name.

A list is text (one URI per line), CSV (a header row; columns --uri_column,
and --id_column and --label_column when present) or Parquet (the same
columns), by file name. Each of its rows is one input: its id is the id
column's value when the list has that column, else its URI as read (see
`resolve_uri`). Lists are read in parallel: a text or CSV list by one
worker, a Parquet list by row group.
"""

import codecs
import csv
import io
from typing import NamedTuple, Optional

import apache_beam as beam

from beam_jobs.contracts import DEFAULT_BATCH_SIZE
from beam_jobs.contracts import ERRORS
from beam_jobs.contracts import INPUTS
from beam_jobs.contracts import counter
from beam_jobs.contracts import error_row
from beam_jobs.contracts import label_column_to_read
from beam_jobs.sources import ImageRefs
from beam_jobs.sources import ReadResult
from beam_jobs.sources import id_text
from beam_jobs.sources import resolve_uri
from beam_jobs.sources import row_groups
from beam_jobs.sources.images import read_refs
from beam_jobs.sources.listing import PARTIAL
from beam_jobs.sources.listing import Groups
from beam_jobs.sources.listing import ListFiles
from beam_jobs.sources.listing import merge_short_groups
from beam_jobs.sources.row_groups import RowGroupItem
from beam_jobs.sources.row_groups import RowRangeError
from beam_jobs.sources.skip_existing import SkipExisting
from beam_jobs.sources.skip_existing import SkipRefs
from imagebatch import paths

# List files per element between listing and reading.
_LISTS_PER_GROUP = 16


def list_format(path: str) -> str:
  """A list file's format, by its name: parquet, csv, else text."""
  name = path.lower()
  if name.endswith(".parquet"):
    return "parquet"
  return "csv" if name.endswith(".csv") else "text"


def csv_records(handle):
  """The records of a CSV list read from a binary handle: UTF-8 (a byte
  order mark dropped, bad bytes kept as surrogate escapes), quoted fields
  that may span lines, and strict, so that a quote never closed raises
  csv.Error instead of swallowing every record after it."""
  text = io.TextIOWrapper(handle, encoding="utf-8-sig",
                          errors="surrogateescape", newline="")
  return csv.reader(text, strict=True)


class ListItem(NamedTuple):
  """A work item of lists: a text or CSV list, read whole, or some row
  groups of a Parquet one (`row_groups`)."""
  kind: str  # text, csv or parquet
  path: str
  row_groups: Optional[RowGroupItem] = None


class _PlanLists(beam.DoFn):
  """Groups of list files in; ListItems out, a Parquet list's by row group
  (and an error row for a Parquet list whose footer cannot be read)."""

  def __init__(self):
    self._planner = row_groups.PlanRowGroups()

  def process(self, lists: list):
    for path in lists:
      kind = list_format(path)
      if kind != "parquet":
        yield ListItem(kind, path)
        continue
      for item in self._planner.process([path]):
        yield (ListItem(kind, path, item) if isinstance(item, RowGroupItem)
               else item)


# A list row on its way to be read: (id, uri, label). Rows travel as plain
# tuples, which Beam encodes several times faster than named ones, until
# `as_image_refs` packs each group into columns.
def row_id(row: tuple) -> str:
  return row[0]


def as_image_refs(rows: list) -> ImageRefs:
  ids, uris, labels = zip(*rows) if rows else ((), (), ())
  return ImageRefs(list(ids), list(uris), list(labels))


class _ReadListItem(beam.DoFn):
  """Reads a ListItem's rows, (id, uri, label), into groups (keyed by
  bucket with `buckets`).

  Each row is one input: a row without a URI, or with a null id when the
  list has an id column, is an error row of its own, named LIST#ROW (ROW
  counts the list's rows from 0: its lines for a text list, its records
  after the header for a CSV one, its rows for a Parquet one). Blank lines
  and records are no rows. A list file that cannot be read, or breaks
  part-way, is one input with one error row naming it.
  """

  def __init__(self, uri_column: str, id_column: Optional[str],
               label_column: Optional[str], batch_size: int,
               buckets: int = 0):
    self._uri_column = uri_column
    self._id_column = id_column
    self._label_column = label_column_to_read(label_column)
    self._batch_size = batch_size
    self._buckets = buckets

  def process(self, item: ListItem):
    groups = Groups(self._batch_size, self._buckets, row_id)
    path = item.path
    if item.kind == "parquet":
      rows = self._parquet_rows(item.row_groups)
    elif item.kind == "csv":
      rows = self._csv_rows(path)
    else:
      rows = self._text_rows(path)
    for row in rows:
      if isinstance(row, dict):
        counter(INPUTS).inc()
        yield beam.pvalue.TaggedOutput(ERRORS, row)
        continue
      ref = self._ref(path, *row)
      if isinstance(ref, dict):
        counter(INPUTS).inc()
        yield beam.pvalue.TaggedOutput(ERRORS, ref)
        continue
      full = groups.add(ref)
      if full is not None:
        yield full
    for group in groups.rest():
      yield (group if self._buckets else
             beam.pvalue.TaggedOutput(PARTIAL, group))

  def _ref(self, path: str, row: int, uri, has_id: bool, id_value, label):
    """A row's (id, uri, label), or its error row."""
    fallback = f"{path}#{row}"
    id_ = None
    if has_id:
      if id_value is None or id_value == "":
        return error_row(fallback, path, "read",
                         f"null id in column {self._id_column!r}; this row "
                         "is named LIST#ROW here")
      id_ = paths.printable(id_text(id_value))
    if isinstance(uri, bytes):
      try:
        uri = uri.decode("utf-8")
      except UnicodeDecodeError:
        text = uri.decode("utf-8", "backslashreplace")
        return error_row(id_ or text, path, "read",
                         "the URI is not valid UTF-8 (its bytes are shown "
                         "escaped as \\xNN); it was not read")
    uri = None if uri is None else str(uri).strip()
    if not uri:
      return error_row(id_ or fallback, path, "read",
                       f"no URI in column {self._uri_column!r}")
    if not paths.is_printable(uri):
      return error_row(id_ or paths.printable(uri), path, "read",
                       "the URI is not valid UTF-8 (its bytes are shown "
                       "escaped as \\xNN); it was not read")
    uri = resolve_uri(uri, path)
    return (id_ or uri, uri, None if label == "" else label)

  @staticmethod
  def _file_error(path: str, error, row: int) -> dict:
    after = f" (rows from {row} on; rows before it were read)" if row else ""
    return error_row(path, path, "read",
                     f"{type(error).__name__}: {error}{after}")

  def _text_rows(self, path: str):
    """One URI per line; surrounding blanks and a UTF-8 byte order mark
    (Windows' Notepad writes one) are dropped."""
    row = 0
    try:
      with paths.open_file(path) as handle:
        for row, line in enumerate(handle):
          line = line.strip()
          if row == 0 and line.startswith(codecs.BOM_UTF8):
            line = line[len(codecs.BOM_UTF8):]
          if line:
            yield row, line, False, None, None
    except Exception as error:  # pylint: disable=broad-except
      yield self._file_error(path, error, row)

  def _csv_rows(self, path: str):
    """A header row, then one record per input (quoted fields may span
    lines). A later list without the --uri_column column fails row by row,
    as a shard without the image column does. The reader is strict: a
    record it cannot read (a quote never closed, text after a closing
    quote) ends the list, in one error row naming it."""
    row = 0
    try:
      with paths.open_file(path) as handle:
        records = csv_records(handle)
        header = next(records, None) or []
        where = {name: i for i, name in enumerate(header)}
        uri_at = where.get(self._uri_column)
        id_at = where.get(self._id_column) if self._id_column else None
        label_at = (where.get(self._label_column) if self._label_column
                    else None)

        def cell(record, at):
          return record[at] if at is not None and at < len(record) else None

        while True:
          line = records.line_num + 1
          try:
            record = next(records, None)
          except csv.Error as error:
            raise csv.Error(f"{error}, in the record from line {line} on"
                            ) from None
          if record is None:
            break
          if not record:
            continue
          yield (row, cell(record, uri_at), id_at is not None,
                 cell(record, id_at), cell(record, label_at))
          row += 1
    except Exception as error:  # pylint: disable=broad-except
      yield self._file_error(path, error, row)

  def _parquet_rows(self, item: RowGroupItem):
    columns = [c for c in (self._uri_column, self._id_column,
                           self._label_column) if c]
    for part in row_groups.read_item(item, columns, 1024):
      if isinstance(part, RowRangeError):
        yield part.error_row(item.path)
        continue
      indices, record_batch = part
      names = record_batch.schema.names

      def values(column):
        return (record_batch.column(column).to_pylist()
                if column and column in names else [None] * len(indices))

      has_id = bool(self._id_column) and self._id_column in names
      for row, uri, id_value, label in zip(indices.tolist(),
                                           values(self._uri_column),
                                           values(self._id_column),
                                           values(self._label_column)):
        yield row, uri, has_id, id_value, label


class ReadInputList(beam.PTransform):
  """Reads the images that list files matched by `pattern` name (see the
  module's docstring); no list in the folder `exclude` is read."""

  def __init__(self, pattern: str, uri_column: str = "uri",
               id_column: Optional[str] = "id",
               label_column: Optional[str] = None,
               batch_size: int = DEFAULT_BATCH_SIZE,
               skip: Optional[SkipExisting] = None,
               exclude: Optional[str] = None):
    super().__init__()
    self._pattern = pattern
    self._batch_size = batch_size
    self._skip = skip
    self._exclude = exclude
    self._reader = _ReadListItem(uri_column, id_column, label_column,
                                 batch_size, skip.buckets if skip else 0)

  def expand(self, pipeline):
    lists, list_errors = pipeline | "ListLists" >> ListFiles(
        self._pattern, _LISTS_PER_GROUP, exclude=self._exclude)
    planned = (lists
               | "SpreadLists" >> beam.Reshuffle()
               | "PlanLists" >> beam.ParDo(_PlanLists()).with_outputs(
                   ERRORS, main="items"))
    rows = (planned.items
            | "SpreadItems" >> beam.Reshuffle()
            | "ReadLists" >> beam.ParDo(self._reader).with_outputs(
                ERRORS, PARTIAL, main="groups"))
    if self._skip:
      groups = rows.groups | "SkipExisting" >> SkipRefs(
          self._skip, self._batch_size, row_id)
    else:
      groups = ((rows.groups, merge_short_groups(rows[PARTIAL],
                                                 self._batch_size))
                | "AllGroups" >> beam.Flatten())
    read = read_refs(groups | "AsImageRefs" >> beam.Map(as_image_refs))
    errors = ((list_errors, planned.errors, rows.errors, read.errors)
              | "ReadErrors" >> beam.Flatten())
    return ReadResult(read.images, errors)
