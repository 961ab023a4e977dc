"""The output folder: what in it is ours, one run at a time, and the commit.

Every rule about what a run may write, replace or delete in `--output` lives
here, so that the guarantees below hold in one place:

* The shards sit in two folders, `predictions/` and `errors/`, so that a
  Parquet reader pointed at one reads that table alone. The manifest
  `_run.json` is the truth: it lists exactly the shard files of the
  folder's current result set, by their paths in the folder, with their
  row counts, and the readers (`tools.query`, `tools.report`,
  `--skip_existing`) read only those (`result_files`). A folder written
  before the two folders (shards at its top) is read as it is; a run that
  keeps its shards moves them in (`move_kept`).
* A run writes its shards under names carrying its run id, which no earlier
  file has (Beam's sinks stage them in `beam-temp-*` folders and rename them
  at the end). Only when all of them are in place is the manifest replaced,
  atomically (`outputs.write_manifest`), and only after that are the earlier
  files it no longer lists deleted. A run killed at any moment therefore
  leaves the earlier complete set under the earlier manifest, or its own
  complete set under its own.
* A run deletes only what is ours: the files the manifest lists or retired,
  and files named for a run that claimed the folder (its id is in the
  manifest or in the lock). A folder holding anything else is refused unless
  --overwrite, which may also delete files of our kinds whoever wrote them
  (OVERWRITE_KINDS) and never any other file.
* One run at a time: `_run.lock` (beam_jobs/output_lock.py). The files of a
  killed run whose lock was taken over are cleaned up by the run that took
  it over; what locking itself leaves (`_run.lock.RUN.tmp|stale`) is ours
  whatever run it names, and the lock cleans it up.
"""

import dataclasses
import os
import re
import shutil
import stat
import tempfile
import time
import uuid
from typing import Optional

import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from beam_jobs import kept_columns
from beam_jobs import outputs
from beam_jobs.output_lock import LOCK_FILE
from beam_jobs.output_lock import LOCK_LEFTOVER
from beam_jobs.output_lock import RUN_ID
from beam_jobs.output_lock import FolderError
from beam_jobs.output_lock import read_record
from imagebatch import paths

KINDS = outputs.KINDS
_KINDS = "|".join(KINDS)
# Shards and Beam's staging folders sit in their kind's folder
# (predictions/, errors/); folders written before that layout (manifest
# version 2) hold them at the top, and are read as they are.
_IN_FOLDER = rf"(?:(?P<folder>{_KINDS})/)?"
_SHARD = re.compile(
    rf"^{_IN_FOLDER}(?P<kind>{_KINDS})-(?P<run>{RUN_ID})-(?P<index>\d{{5}})"
    rf"-of-(?P<count>\d{{5}}){re.escape(outputs.PARQUET_SUFFIX)}$")
# Everything else a run names for itself: Beam's staging folders, and the
# temporary files of the manifest and lock writes.
_RUN_NAMED = (
    _SHARD,
    re.compile(rf"^{_IN_FOLDER}beam-temp-(?P<kind>{_KINDS})-(?P<run>{RUN_ID})"
               r"-[0-9a-f]{32}$"),
    re.compile(rf"^{re.escape(outputs.MANIFEST_FILE)}\.(?P<run>{RUN_ID})\.tmp$"),
    LOCK_LEFTOVER,
)
# What --overwrite may delete although no manifest or lock names it.
OVERWRITE_KINDS = re.compile(
    rf"^(?:(?:{_KINDS})/)?(?:(?:{_KINDS})-.*{re.escape(outputs.PARQUET_SUFFIX)}"
    rf"|beam-temp-(?:{_KINDS})-.*)$"
    rf"|^{re.escape(outputs.MANIFEST_FILE)}(?:\..*\.tmp)?$", re.DOTALL)
# What a manifest may list under a kind: shard names of that kind, in the
# kind's folder (or, written before it, in the folder itself).
_SHARD_KINDS = {kind: re.compile(
    rf"^(?:{kind}/)?{kind}-[^/\\]*{re.escape(outputs.PARQUET_SUFFIX)}$",
    re.DOTALL) for kind in KINDS}
OVERWRITE_HELP = ("--overwrite deletes only predictions-*.parquet, "
                  "errors-*.parquet, beam-temp-predictions-*/beam-temp-errors-* "
                  "staging (in the folder and in its predictions/ and errors/) "
                  "and _run.json, and leaves every other file alone")
_MAX_LISTED = 5


def new_run_id() -> str:
  return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + (
      "-" + uuid.uuid4().hex[:6])


def run_of(name: str) -> Optional[str]:
  """The run id a file or folder name of ours carries, or None. `name` is
  relative to the output folder (`predictions/...` for a shard)."""
  for pattern in _RUN_NAMED:
    match = pattern.match(name)
    if match and match.groupdict().get("folder") in (
        None, match.groupdict().get("kind")):
      return match["run"]
  return None


def _is_lock_leftover(name: str) -> bool:
  return bool(LOCK_LEFTOVER.match(name))


def _names(output: str) -> list:
  """The names in the folder, relative to it: its own entries (files,
  folders, prefixes), and those of its predictions/ and errors/ folders as
  `KIND/NAME`. Raises FolderError for a predictions or errors entry that
  is not a folder: a link there would take the shards elsewhere."""
  if paths.is_remote(output):
    prefix = output.rstrip("/") + "/"
    try:
      found = FileSystems.match([prefix + "**"])[0].metadata_list
    except Exception as error:  # pylint: disable=broad-except
      # No credentials, no access to the bucket, say: one line.
      text = str(error).strip().splitlines()
      raise FolderError(
          f"--output {output} cannot be listed ({type(error).__name__}: "
          f"{text[0][:300] if text else ''})") from None
    names = set()
    for metadata in found:
      if not metadata.path.startswith(prefix):
        continue
      parts = metadata.path[len(prefix):].split("/")
      names.add(parts[0])
      if parts[0] in KINDS and len(parts) > 1 and parts[1]:
        names.add(f"{parts[0]}/{parts[1]}")
    return sorted(names)
  try:
    names = os.listdir(output)
  except FileNotFoundError:
    return []
  except NotADirectoryError:
    raise FolderError(f"--output {output} is a file, not a folder") from None
  inside = []
  for kind in KINDS:
    if kind not in names:
      continue
    folder = os.path.join(output, kind)
    if not stat.S_ISDIR(os.lstat(folder).st_mode):
      raise FolderError(
          f"--output {output}: {kind} there is a file or a link, not the "
          f"folder this tool writes its {kind} shards in; move it away, or "
          "choose another folder")
    inside += [f"{kind}/{name}" for name in os.listdir(folder)]
  return sorted(names + inside)


def _listed(manifest: Optional[dict], kind: Optional[str] = None) -> list:
  """The manifest's shard entries ({"name", "rows"}), of one kind or all."""
  files = (manifest or {}).get("files") or {}
  entries = []
  for name in [kind] if kind else KINDS:
    for entry in files.get(name) or []:
      if _SHARD_KINDS[name].match(entry.get("name", "")):
        entries.append(entry)
  return entries


def _strings(value) -> set:
  """The strings of a manifest or lock field that should be a list of them."""
  return {item for item in value if isinstance(item, str)} if isinstance(
      value, list) else set()


@dataclasses.dataclass
class FolderState:
  """What an output folder holds, and which of it is ours."""
  output: str
  names: list
  manifest: Optional[dict] = None
  manifest_problem: Optional[str] = None
  lock: Optional[dict] = None

  def listed_names(self) -> set:
    return {entry["name"] for entry in _listed(self.manifest)}

  def claimed_runs(self) -> set:
    """Run ids whose files are ours: the manifest's, and the lock's."""
    runs = set()
    manifest = self.manifest or {}
    if isinstance(manifest.get("run_id"), str):
      runs.add(manifest["run_id"])
    runs.update(filter(None, (run_of(name) for name in self.listed_names())))
    if self.lock:
      runs.add(self.lock.get("run_id"))
      runs.update(_strings(self.lock.get("claims")))
    return {run for run in runs if isinstance(run, str)}

  def ours(self, name: str, extra_runs=()) -> bool:
    if _permanent(name):
      return True
    if name in self.listed_names():
      return True
    # Retired names are ours only if they are named as ours are, so that a
    # manifest edited by hand cannot make a run delete anything else.
    if name in _strings((self.manifest or {}).get("retired")) and (
        OVERWRITE_KINDS.match(name) or run_of(name)):
      return True
    return run_of(name) in self.claimed_runs().union(extra_runs)

  def accepted(self) -> set:
    """Other files a run with --overwrite found and left alone; they no
    longer stop a run."""
    return _strings((self.manifest or {}).get("others"))

  def foreign(self) -> list:
    """What is not ours and was never accepted: these stop a run."""
    accepted = self.accepted()
    return [name for name in self.names
            if not self.ours(name) and name not in accepted]

  def kept_predictions(self) -> list:
    """The manifest's prediction shards, which --skip_existing keeps."""
    return _listed(self.manifest, outputs.PREDICTIONS_PREFIX)


def _permanent(name: str) -> bool:
  """Names that are ours whatever run wrote them, and that no commit
  retires: the manifest, the lock and what locking leaves (cleaned up by
  the lock itself), and the kinds' folders."""
  return (name in (outputs.MANIFEST_FILE, LOCK_FILE) or name in KINDS or
          _is_lock_leftover(name))


def inspect(output: str) -> FolderState:
  """Lists the folder and reads its manifest and lock; never raises for a
  damaged manifest (see FolderState.manifest_problem)."""
  state = FolderState(output, _names(output))
  if outputs.MANIFEST_FILE in state.names:
    try:
      state.manifest = outputs.read_manifest(output)
    except outputs.ManifestError as error:
      state.manifest_problem = str(error)
  if LOCK_FILE in state.names:
    state.lock = read_record(output)
  return state


def check_writable(output: str) -> None:
  """Refuses, before any work, a local folder that cannot be made or written.

  An object store answers only when written to, so a gs:// folder is first
  written by the lock, which fails in one line too.
  """
  if paths.is_remote(output):
    return
  try:
    os.makedirs(output, exist_ok=True)
    with tempfile.TemporaryFile(dir=output):
      pass
  except OSError as error:
    raise FolderError(f"--output {output}: cannot write there "
                      f"({error.strerror or error})") from None


def check(state: FolderState, model_id: str, overwrite: bool,
          skip_existing: bool = False, schema=None) -> None:
  """Refuses, in one line, a folder this run may not write to.

  A folder already holding this model's results is refused too unless the
  user says what to do with them: keep them (--skip_existing) or replace
  them (--overwrite); a re-run never replaces them silently. With
  --skip_existing and the run's predictions `schema`, the kept shards must
  have its optional columns (kept_columns.check).
  """
  output = state.output
  if state.manifest_problem and not overwrite:
    raise FolderError(
        f"--output: {state.manifest_problem}, so which files in {output} "
        "are results cannot be told; pass --overwrite to replace them "
        f"({OVERWRITE_HELP}), or choose another folder")
  previous = state.manifest
  if previous and previous.get("model_id") != model_id and not overwrite:
    raise FolderError(
        f"--output {output} holds results of model "
        f"{previous.get('model_id')}, not {model_id}; choose another "
        "folder or pass --overwrite")
  if (previous and previous.get("model_id") == model_id and
      not (overwrite or skip_existing)):
    counts = previous.get("counts") or {}
    held = (f" ({counts.get('predictions')} predictions, "
            f"{counts.get('errors')} errors)" if counts else "")
    raise FolderError(
        f"--output {output} already holds results of this model from run "
        f"{previous.get('run_id')}{held}; pass --skip_existing to classify "
        "only inputs it lacks, --overwrite to replace them, or choose "
        "another folder")
  foreign = state.foreign()
  if foreign and not overwrite:
    shown = ", ".join(paths.printable(name) for name in foreign[:_MAX_LISTED])
    more = (f" and {len(foreign) - _MAX_LISTED} more"
            if len(foreign) > _MAX_LISTED else "")
    raise FolderError(
        f"--output {output} holds files this tool did not write there "
        f"({shown}{more}); choose an empty or new folder, or pass "
        f"--overwrite ({OVERWRITE_HELP})")
  if skip_existing and schema is not None:
    kept_columns.check(state, schema)


def result_files(output: str) -> dict:
  """The shard paths of the folder's current result set, by kind.

  With a manifest, exactly the files it lists, in the layout it was
  written in (KIND/ folders, or, before them, the folder itself). A folder
  without one (written by hand or by an older version) is read by its file
  names, in both layouts. Raises outputs.ManifestError for a damaged
  manifest, or for a local predictions/ or errors/ that is a link or a
  file: its shards would be read from elsewhere.
  """
  manifest = outputs.read_manifest(output)
  if manifest is not None and "files" in manifest:
    files = {kind: [paths.join(output, entry["name"])
                    for entry in _listed(manifest, kind)] for kind in KINDS}
  else:
    files = {kind: paths.match_paths(outputs.shard_glob(output, kind)) +
                   paths.match_paths(outputs.legacy_shard_glob(output, kind))
             for kind in KINDS}
  if not paths.is_remote(output):
    for kind in KINDS:
      folder = os.path.join(output, kind)
      if os.path.lexists(folder) and not stat.S_ISDIR(
          os.lstat(folder).st_mode):
        raise outputs.ManifestError(
            f"{folder} is a file or a link, not the folder this tool writes "
            f"its {kind} shards in; they were not read")
  return files


def listed_rows(manifest: Optional[dict]) -> dict:
  """{shard file name: row count} as the manifest records them, keyed by
  the file's own name (the last part of result_files' paths)."""
  return {entry["name"].rsplit("/", 1)[-1]: entry.get("rows")
          for entry in _listed(manifest)}


def _footer_rows(path: str) -> int:
  with FileSystems.open(
      path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
    return pq.ParquetFile(handle).metadata.num_rows


def run_shards(output: str, run_id: str, names: list) -> dict:
  """This run's shards among the folder's `names`, by kind, checked
  complete (every SSSSS of NNNNN)."""
  found = {kind: [] for kind in KINDS}
  for name in names:
    match = _SHARD.match(name)
    if match and match["run"] == run_id and match["folder"] == match["kind"]:
      found[match["kind"]].append(match)
  shards = {}
  for kind, matches in found.items():
    counts = {int(m["count"]) for m in matches}
    indexes = sorted(int(m["index"]) for m in matches)
    if matches and (len(counts) != 1 or indexes != list(range(counts.pop()))):
      raise FolderError(
          f"{output}: the {kind} shards of run {run_id} are incomplete "
          f"({len(matches)} found); nothing was committed")
    shards[kind] = sorted(m.string for m in matches)
  return shards


def _delete(output: str, name: str) -> None:
  """Deletes one entry of the folder: a file, or a staging folder whole.

  A symbolic link is removed itself, never followed.
  """
  path = paths.join(output, name)
  if paths.is_remote(output):
    matched = [m.path for result in FileSystems.match([path, path + "/**"])
               for m in result.metadata_list]
    if matched:
      FileSystems.delete(matched)
    return
  try:
    mode = os.lstat(path).st_mode
  except FileNotFoundError:
    return
  if stat.S_ISDIR(mode):
    shutil.rmtree(path)
  else:
    os.unlink(path)


def delete_entries(output: str, names) -> None:
  for name in names:
    _delete(output, name)


def discard_run(output: str, run_id: str) -> None:
  """Deletes everything a failed run wrote; its shards were never listed."""
  delete_entries(output, [name for name in _names(output)
                          if run_of(name) == run_id])


def plan_commit(state: FolderState, run_id: str, keep: list, overwrite: bool,
                inherited_runs=()) -> dict:
  """The manifest fields that describe the folder once this run commits.

  `files`: this run's shards (checked complete) and the kept ones, with row
  counts from their footers; `totals` and `written` (this run's shards
  alone) count their rows; `retired` names what the commit replaces and
  deletes. `state` is the folder as it was when the run took the lock;
  `keep` are entries of its manifest (see `move_kept`).
  """
  output = state.output
  names = _names(output)  # The folder now, with this run's shards.
  shards = run_shards(output, run_id, names)
  new = {kind: [{"name": name, "rows": _footer_rows(paths.join(output, name))}
                for name in names] for kind, names in shards.items()}
  files = {
      outputs.PREDICTIONS_PREFIX: [dict(entry) for entry in keep] +
                                  new[outputs.PREDICTIONS_PREFIX],
      outputs.ERRORS_PREFIX: new[outputs.ERRORS_PREFIX],
  }
  listed = {entry["name"] for kind in files.values() for entry in kind}
  runs = set(inherited_runs) | {run_id}
  retired = sorted(
      name for name in set(state.names).union(names)
      if name not in listed and not _permanent(name)
      and (state.ours(name, runs) or (
          overwrite and name in state.names and OVERWRITE_KINDS.match(name))))
  others = sorted(name for name in state.names
                  if name not in retired and not state.ours(name, runs) and (
                      overwrite or name in state.accepted()))
  return {
      "files": files,
      "totals": _row_totals(files),
      "written": _row_totals(new),
      # Named before they go, so that a run killed while deleting them
      # leaves them recognisably ours for the next one.
      "retired": retired,
      "others": others,
  }


def move_kept(output: str, keep: list) -> list:
  """The kept entries (--skip_existing) in the current layout: a shard a
  run before it wrote in the folder itself is copied into its kind's
  folder, under its own name, so that predictions/ holds the whole result
  set. The copy is a hard link where the disk allows one; the original
  stays listed until the commit retires it, so a run killed here leaves
  the earlier manifest true."""
  moved = []
  for entry in keep:
    name = entry["name"]
    if "/" not in name:
      target = f"{outputs.PREDICTIONS_PREFIX}/{name}"
      _copy(paths.join(output, name), paths.join(output, target))
      entry = dict(entry, name=target)
    moved.append(entry)
  return moved


def _copy(source: str, target: str) -> None:
  if paths.is_remote(source):
    FileSystems.copy([source], [target])
    return
  if not stat.S_ISREG(os.lstat(source).st_mode):
    raise FolderError(f"{paths.printable(source)}, a shard the manifest "
                      "keeps, is not a regular file; nothing was committed")
  os.makedirs(os.path.dirname(target), exist_ok=True)
  if os.path.lexists(target):
    # A copy made by a run killed before its commit: ours, and redone.
    os.unlink(target)
  try:
    os.link(source, target, follow_symlinks=False)
  except OSError:
    shutil.copyfile(source, target, follow_symlinks=False)


def _row_totals(files: dict) -> dict:
  return {kind: sum(entry.get("rows") or 0 for entry in entries)
          for kind, entries in files.items()}


def commit(output: str, manifest: dict) -> None:
  """Writes the manifest (the commit point), then deletes what it retired."""
  outputs.write_manifest(output, manifest)
  delete_entries(output, manifest["retired"])
