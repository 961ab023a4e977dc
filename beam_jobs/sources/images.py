"""ReadImageFiles: every file under a folder or glob, local or remote, read
in groups; and the group reader that lists of URIs share."""

import concurrent.futures
from typing import Optional

import apache_beam as beam

from beam_jobs.contracts import DEFAULT_BATCH_SIZE
from beam_jobs.contracts import ERRORS
from beam_jobs.contracts import INPUTS
from beam_jobs.contracts import ImageBatch
from beam_jobs.contracts import counter
from beam_jobs.contracts import error_row
from beam_jobs.sources import ImageRefs
from beam_jobs.sources import ReadResult
from beam_jobs.sources.listing import ListFiles
from beam_jobs.sources.skip_existing import SkipExisting
from beam_jobs.sources.skip_existing import SkipRefs
from imagebatch import paths

# An object store answers each small read after tens of milliseconds, so a
# group of remote files is read by this many threads at once; local files
# read faster one after another.
REMOTE_READ_THREADS = 16


def read_image(uri: str):
  """An image file's bytes, or the exception that reading it raised.

  Images are read as stored, never decompressed by file name; a local FIFO,
  socket or device is refused before it is opened, and a gs:// one when
  Cloud Storage cannot be reached (paths.open_file)."""
  try:
    with paths.open_file(uri) as handle:
      return handle.read()
  except Exception as error:  # pylint: disable=broad-except
    return error


def folder_refs(group: list, base: str, class_names: frozenset) -> ImageRefs:
  """A group of a folder's paths as inputs: each path is its own id, and
  its label is the name of its class folder under `base`, if any."""
  return ImageRefs(group, group,
                   [paths.folder_label(path, base, class_names)
                    for path in group])


class _ReadFileGroup(beam.DoFn):
  """Reads the files of one ImageRefs group into one ImageBatch of encoded
  bytes, and an error row for each file that cannot be read."""

  def __init__(self, threads: Optional[int] = None):
    self._threads = threads
    self._pool = None

  def setup(self):
    threads = self._threads or REMOTE_READ_THREADS
    self._pool = (concurrent.futures.ThreadPoolExecutor(threads)
                  if threads > 1 else None)

  def teardown(self):
    if self._pool:
      self._pool.shutdown(wait=False)

  def process(self, refs: ImageRefs):
    counter(INPUTS).inc(len(refs.ids))
    # Threads for remote files (or when asked for): a pool's hand-offs cost
    # more than a local read.
    threaded = self._pool and (self._threads or any(
        paths.is_remote(uri) for uri in refs.uris))
    results = (self._pool.map(read_image, refs.uris) if threaded
               else map(read_image, refs.uris))
    batch = ImageBatch(ids=[], sources=[], true_labels=[], encoded=[])
    for id_, uri, label, result in zip(refs.ids, refs.uris, refs.labels,
                                       results):
      if isinstance(result, Exception):
        yield beam.pvalue.TaggedOutput(ERRORS,
                                       error_row(id_, uri, "read", result))
        continue
      batch.ids.append(id_)
      batch.sources.append(uri)
      batch.true_labels.append(label)
      batch.encoded.append(result)
    if batch.ids:
      yield batch


def read_refs(refs) -> ReadResult:
  """ImageRefs groups, spread over the workers, read."""
  read = (refs
          # Groups leave their listing where it ran; spread them first.
          | "SpreadGroups" >> beam.Reshuffle()
          | "ReadFiles" >> beam.ParDo(_ReadFileGroup()).with_outputs(
              ERRORS, main="images"))
  return ReadResult(read.images, read.errors)


class ReadImageFiles(beam.PTransform):
  """Reads every file under a directory or glob, local or remote.

  The pattern is listed in parallel (listing.py) and handed on in groups,
  so the per-element cost of the graph is paid once per group rather than
  once per image; with `skip`, the paths already predicted are dropped by
  bucket before any file is read. `storage_client` stands in for
  google-cloud-storage's client when listing gs:// (tests pass a fake one).
  Nothing in the folder `exclude` (the run's output) is an input.
  """

  def __init__(self, pattern: str, class_names: list,
               batch_size: int = DEFAULT_BATCH_SIZE,
               skip: Optional[SkipExisting] = None, storage_client=None,
               exclude: Optional[str] = None):
    super().__init__()
    self._pattern = paths.expand_pattern(pattern)
    self._class_names = frozenset(class_names)
    self._batch_size = batch_size
    self._skip = skip
    self._storage_client = storage_client
    self._exclude = exclude

  def expand(self, pipeline):
    buckets = self._skip.buckets if self._skip else 0
    groups, list_errors = pipeline | "ListFiles" >> ListFiles(
        self._pattern, self._batch_size, buckets, self._storage_client,
        self._exclude)
    if self._skip:
      groups = groups | "SkipExisting" >> SkipRefs(self._skip,
                                                   self._batch_size)
    refs = groups | "AsImageRefs" >> beam.Map(
        folder_refs, paths.pattern_base(self._pattern), self._class_names)
    read = read_refs(refs)
    errors = ((list_errors, read.errors) | "ReadErrors" >> beam.Flatten())
    return ReadResult(read.images, errors)
