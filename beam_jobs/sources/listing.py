"""Listing image files at scale: a folder or glob becomes listing work
items, listed in parallel and streamed out in groups of paths.

The pattern's base (the folder above its first glob character) is listed
one level at a time for EXPAND_LEVELS levels: a folder's files go out in
groups as they are listed, and its sub-folders become the work items of the
next level, spread over the workers. Each folder left after that is listed
whole, recursively, by one worker. No stage holds more than one group of
paths per work item (per bucket with --skip_existing), plus the folders it
has still to visit.

* Local folders: os.scandir, no stat per file beyond telling a folder from
  a file (`paths.scan_local`, the rules os.walk follows).
* gs://: google-cloud-storage list pages (1,000 names each): a prefix with
  the `/` delimiter for a level, no delimiter for a whole folder. Objects
  whose names end in `/` are the console's folder markers, not images, and
  are left out.
* Any other file system Beam knows (a --beam_plugins one, say): the whole
  pattern through FileSystems.match, in one work item, as before.

Paths are matched with Beam's pattern rules (`paths.pattern_regex`): `*`
within a folder, `**` across folders. A sub-folder that cannot hold a match
(too deep for a pattern without `**`, or whose name a literal or `*` part of
the pattern refuses) is not listed at all. Order is not kept, and was never
promised: groups leave in the order they fill, the last group of each work
item goes to a merge (`MergeGroups`) so batches stay full however many
small folders there are, and every group is spread over the workers again
before it is read.
"""

import os
import posixpath
import re
from typing import Optional

import apache_beam as beam

from beam_jobs.contracts import ERRORS
from beam_jobs.contracts import INPUTS
from beam_jobs.contracts import counter
from beam_jobs.contracts import error_row
from beam_jobs.contracts import id_bucket
from imagebatch import paths

# Levels listed one folder at a time, each level's folders spread over the
# workers, before the folders left are listed whole. Two levels split a
# class-folder layout (base/CLASS/files) by class and a dated one
# (base/YEAR/MONTH/...) by month.
EXPAND_LEVELS = 2
FOLDERS = "folders"
PARTIAL = "partial"


def same(item):
  """The default `id_of`: a path or an id is its own id."""
  return item


class Groups:
  """Gathers items (paths, ids, input rows) into groups of `batch_size`.

  With `buckets`, one group is gathered per bucket of the items' ids
  (`id_of(item)`, hashed by `contracts.id_bucket`) and a full group leaves
  as (bucket, items), for a join by bucket; `rest` gives what is left of
  each.
  """

  def __init__(self, batch_size: int, buckets: int = 0, id_of=same):
    self._batch_size = batch_size
    self._buckets = buckets
    self._id_of = id_of
    self._open = {}

  def add(self, item):
    """Returns a full group (keyed by bucket with `buckets`), or None."""
    key = (id_bucket(self._id_of(item), self._buckets) if self._buckets
           else None)
    group = self._open.setdefault(key, [])
    group.append(item)
    if len(group) < self._batch_size:
      return None
    del self._open[key]
    return (key, group) if self._buckets else group

  def rest(self):
    """The groups still open, each once."""
    for key, group in self._open.items():
      yield (key, group) if self._buckets else group
    self._open = {}


class PatternSpec:
  """What listing needs to know of a pattern: its base folder, its regular
  expression, and which sub-folders may hold a match. Nothing in the folder
  `exclude` (the run's own output, when it sits inside the input) does."""

  def __init__(self, pattern: str, exclude: Optional[str] = None):
    pattern = paths.folder_pattern(pattern)
    self.pattern = pattern
    self.exclude = exclude
    self.literal = not re.search(r"[*?\[]", pattern)
    self.base = paths.pattern_base(pattern)
    # The base as listings name it: no trailing slash for a local folder
    # ("/" itself aside), one for a gs:// prefix.
    self.root = (self.base if paths.is_remote(self.base) else
                 self.base.rstrip("/") or "/")
    self.regex = paths.pattern_regex(pattern)
    self.recursive = "**" in pattern
    rest = pattern[len(self.base):]
    # `?` and `[...]` may match a `/` in Beam's rules, so only patterns
    # without them are pruned.
    simple = not re.search(r"\*\*|[?\[]", rest)
    self.max_depth = rest.count("/") if simple else None
    self._folder_names = []
    for part in rest.split("/")[:-1]:
      if re.search(r"\*\*|[?\[]", part):
        break
      self._folder_names.append(paths.pattern_regex(part))

  def depth(self, folder: str) -> int:
    """How many folders down from the base `folder` is (1: a child)."""
    return folder[len(self.base):].rstrip("/").count("/") + 1

  def excluded(self, path: str) -> bool:
    return paths.is_below(path, self.exclude)

  def may_hold_matches(self, folder: str) -> bool:
    if self.excluded(folder):
      return False
    depth = self.depth(folder)
    if self.max_depth is not None and depth > self.max_depth:
      return False
    if depth <= len(self._folder_names):
      name = posixpath.basename(folder.rstrip("/"))
      return bool(self._folder_names[depth - 1].match(name))
    return True


FILE, FOLDER, UNLISTABLE = "file", "folder", "unlistable"


class LocalLister:
  """Lists local folders (imagebatch/paths.py's scandir rules)."""

  def scan(self, folder: str):
    """One level: yields (path, FILE | FOLDER | UNLISTABLE)."""
    try:
      for path, is_folder in paths.scan_local(folder):
        yield path, FOLDER if is_folder else FILE
    except OSError:
      yield folder, UNLISTABLE

  def walk(self, folder: str, descend):
    """Everything below: yields (path, FILE | UNLISTABLE)."""
    for path, listed in paths.walk_local(folder, descend):
      yield path, FILE if listed else UNLISTABLE

  def exists(self, path: str) -> bool:
    return os.path.lexists(path)


class GcsLister:
  """Lists gs:// prefixes with google-cloud-storage, a page at a time.

  `client` stands in for google.cloud.storage's Client (tests pass a fake
  one); without it each worker makes its own, with default credentials.
  """

  # Only the names travel: the listing's answers stay small.
  _FIELDS = "items(name),prefixes,nextPageToken"

  def __init__(self, client=None):
    self._client = client

  def _list(self, folder: str, delimiter: Optional[str]):
    if self._client is None:
      from google.cloud import storage  # pylint: disable=import-outside-toplevel
      self._client = storage.Client()
    bucket, _, prefix = folder[len("gs://"):].partition("/")
    blobs = self._client.list_blobs(bucket, prefix=prefix, delimiter=delimiter,
                                    fields=self._FIELDS)
    for page in blobs.pages:
      for blob in page:
        if not blob.name.endswith("/"):
          yield f"gs://{bucket}/{blob.name}", FILE
      for sub_folder in getattr(page, "prefixes", ()):
        yield f"gs://{bucket}/{sub_folder}", FOLDER

  def scan(self, folder: str):
    return self._list(folder, "/")

  def walk(self, folder: str, descend):
    del descend  # One flat listing costs fewer calls than pruning would save.
    return self._list(folder, None)

  def exists(self, path: str) -> bool:
    from apache_beam.io.filesystems import FileSystems  # pylint: disable=import-outside-toplevel
    return FileSystems.exists(path)


class MatchLister:
  """Any other file system: the whole pattern in one FileSystems.match."""

  def __init__(self, pattern: str):
    self._pattern = pattern

  def scan(self, folder: str):
    del folder
    from apache_beam.io.filesystems import FileSystems  # pylint: disable=import-outside-toplevel
    for metadata in FileSystems.match([self._pattern])[0].metadata_list:
      yield metadata.path, FILE

  def walk(self, folder: str, descend):
    del descend
    return self.scan(folder)

  def exists(self, path: str) -> bool:
    from apache_beam.io.filesystems import FileSystems  # pylint: disable=import-outside-toplevel
    return FileSystems.exists(path)


def make_lister(pattern: str, storage_client=None):
  if not paths.is_remote(pattern):
    return LocalLister()
  if pattern.startswith("gs://"):
    return GcsLister(storage_client)
  return MatchLister(pattern)


def _name_error(path: str) -> dict:
  """The error row of a file whose name is not valid UTF-8: it is never
  read, and its id is the name with the undecodable bytes escaped."""
  name = paths.printable(path)
  return error_row(name, name, "read",
                   "the file name is not valid UTF-8 (its bytes are shown "
                   "escaped as \\xNN); the file was not read")


class ListFolder(beam.DoFn):
  """Lists one work item (a folder) and streams its matches out in groups.

  `whole`: the folder and everything below it; otherwise its files, with
  its sub-folders going out as work items (the FOLDERS output). A name that
  is not valid UTF-8 cannot travel between stages as text: such a file is
  an error row here, and such a folder is listed here, whole.
  """

  def __init__(self, spec: PatternSpec, batch_size: int, buckets: int = 0,
               whole: bool = False, storage_client=None):
    self._spec = spec
    self._batch_size = batch_size
    self._buckets = buckets
    self._whole = whole
    self._storage_client = storage_client

  def setup(self):
    self._lister = make_lister(self._spec.pattern, self._storage_client)

  def process(self, folder: str):
    groups = Groups(self._batch_size, self._buckets)
    spec = self._spec
    if spec.literal:
      # A pattern with no glob names one file (a single shard, say).
      if self._lister.exists(folder) and not spec.excluded(folder):
        yield from self._file(folder, groups)
    elif self._whole:
      yield from self._walk(folder, groups)
    else:
      for path, kind in self._lister.scan(folder):
        if kind != FOLDER:
          yield from self._entry(path, kind, groups)
        elif not spec.may_hold_matches(path):
          continue
        elif paths.is_printable(path):
          yield beam.pvalue.TaggedOutput(FOLDERS, path)
        else:
          yield from self._walk(path, groups)
    for group in groups.rest():
      # Without buckets, a work item's last group is merged with others.
      yield (group if self._buckets else
             beam.pvalue.TaggedOutput(PARTIAL, group))

  def _walk(self, folder: str, groups: Groups):
    for path, kind in self._lister.walk(folder, self._spec.may_hold_matches):
      yield from self._entry(path, kind, groups)

  def _entry(self, path: str, kind: str, groups: Groups):
    if self._spec.excluded(path):
      return  # The run's own output folder (a flat gs:// listing holds it).
    if kind == FILE:
      if self._spec.regex.match(path):
        yield from self._file(path, groups)
    # A sub-folder that cannot be listed goes on as a path under a
    # recursive pattern, so that reading it fails visibly; the base itself
    # not existing is no match.
    elif kind == UNLISTABLE and self._spec.recursive and (
        path != self._spec.root and self._lister.exists(path)):
      yield from self._file(path, groups)

  def _file(self, path: str, groups: Groups):
    if not paths.is_printable(path):
      counter(INPUTS).inc()
      yield beam.pvalue.TaggedOutput(ERRORS, _name_error(path))
      return
    group = groups.add(path)
    if group is not None:
      yield group


class MergeGroups(beam.DoFn):
  """Merges the short last groups of many work items into full groups."""

  def __init__(self, batch_size: int):
    self._batch_size = batch_size

  def process(self, keyed_groups):
    _, short = keyed_groups
    groups = Groups(self._batch_size)
    for group in short:
      for ref in group:
        full = groups.add(ref)
        if full is not None:
          yield full
    yield from groups.rest()


def merge_short_groups(short, batch_size: int, label: str = ""):
  """The short groups of many work items, merged into full ones (one key:
  each holds less than a group)."""
  return (short
          | f"KeyShort{label}" >> beam.Map(lambda group: (None, group))
          | f"GatherShort{label}" >> beam.GroupByKey()
          | f"MergeShort{label}" >> beam.ParDo(MergeGroups(batch_size)))


class ListFiles(beam.PTransform):
  """A pattern in; groups of matching paths out, plus error rows. Nothing
  below the folder `exclude` is listed.

  With `buckets`, the groups come out keyed by the bucket of their paths,
  (bucket, [path, ...]), for the --skip_existing join; otherwise as lists
  of up to `batch_size` paths.
  """

  def __init__(self, pattern: str, batch_size: int, buckets: int = 0,
               storage_client=None, exclude: Optional[str] = None):
    super().__init__()
    self._spec = PatternSpec(pattern, exclude)
    self._batch_size = batch_size
    self._buckets = buckets
    self._storage_client = storage_client

  def _lister(self, whole: bool):
    return ListFolder(self._spec, self._batch_size, self._buckets, whole,
                      self._storage_client)

  def expand(self, pipeline):
    spec = self._spec
    items = pipeline | "Base" >> beam.Create(
        [spec.pattern if spec.literal else spec.root])
    groups, short, errors = [], [], []
    for level in range(EXPAND_LEVELS + 1):
      whole = level == EXPAND_LEVELS
      if level:
        # Each level's folders go to every worker before they are listed.
        items = items | f"SpreadFolders{level}" >> beam.Reshuffle()
      listed = items | f"List{level}" >> beam.ParDo(
          self._lister(whole)).with_outputs(ERRORS, FOLDERS, PARTIAL,
                                            main="groups")
      groups.append(listed.groups)
      short.append(listed[PARTIAL])
      errors.append(listed[ERRORS])
      items = listed[FOLDERS]
    if not self._buckets:
      groups.append(merge_short_groups(
          tuple(short) | "AllShort" >> beam.Flatten(), self._batch_size))
    return (tuple(groups) | "AllGroups" >> beam.Flatten(),
            tuple(errors) | "ListErrors" >> beam.Flatten())
