"""The output folder: what in it is ours, one run at a time, and the commit.

Every rule about what a run may write, replace or delete in `--output` lives
here, so that the guarantees below hold in one place:

* The manifest `_run.json` is the truth. It lists exactly the shard files of
  the folder's current result set, with their row counts, and the readers
  (`tools.query`, `tools.report`, `--skip_existing`) read only those.
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
* One run at a time: `_run.lock` is created exclusively (a hard link, which
  fails if the name exists, on local disks; an object written with
  if_generation_match=0 on gs://). A lock left by a killed run on this host
  (its process is gone) is taken over, and the files of the killed run are
  cleaned up by the run that takes over.
"""

import contextlib
import dataclasses
import json
import os
import re
import shutil
import socket
import stat
import tempfile
import time
import uuid
from typing import Optional

import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from beam_jobs import outputs
from imagebatch import paths

LOCK_FILE = "_run.lock"
RUN_ID = r"\d{8}T\d{6}-[0-9a-f]{6}"
_KINDS = f"{outputs.PREDICTIONS_PREFIX}|{outputs.ERRORS_PREFIX}"
_SHARD = re.compile(rf"^(?P<kind>{_KINDS})-(?P<run>{RUN_ID})-(?P<index>\d{{5}})"
                    rf"-of-(?P<count>\d{{5}}){re.escape(outputs.PARQUET_SUFFIX)}$")
# Everything else a run names for itself: Beam's staging folders, and the
# temporary files of the manifest and lock writes.
_RUN_NAMED = (
    _SHARD,
    re.compile(rf"^beam-temp-(?:{_KINDS})-(?P<run>{RUN_ID})-[0-9a-f]{{32}}$"),
    re.compile(rf"^{re.escape(outputs.MANIFEST_FILE)}\.(?P<run>{RUN_ID})\.tmp$"),
    re.compile(rf"^{re.escape(LOCK_FILE)}\.(?P<run>{RUN_ID})\.(?:tmp|stale)$"),
)
# What --overwrite may delete although no manifest or lock names it.
OVERWRITE_KINDS = re.compile(
    rf"^(?:(?:{_KINDS})-.*{re.escape(outputs.PARQUET_SUFFIX)}"
    rf"|beam-temp-(?:{_KINDS})-.*"
    rf"|{re.escape(outputs.MANIFEST_FILE)}(?:\..*\.tmp)?)$", re.DOTALL)
# What a manifest may list: shard names of ours, in the folder itself.
_SHARD_KINDS = re.compile(
    rf"^(?:{_KINDS})-[^/\\]*{re.escape(outputs.PARQUET_SUFFIX)}$", re.DOTALL)
OVERWRITE_HELP = ("--overwrite deletes only predictions-*.parquet, "
                  "errors-*.parquet, beam-temp-predictions-*/beam-temp-errors-* "
                  "staging and _run.json, and leaves every other file alone")
_MAX_LISTED = 5


class FolderError(ValueError):
  """An output folder this run may not write to, as it stands."""


def new_run_id() -> str:
  return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + (
      "-" + uuid.uuid4().hex[:6])


def run_of(name: str) -> Optional[str]:
  """The run id a file or folder name of ours carries, or None."""
  for pattern in _RUN_NAMED:
    match = pattern.match(name)
    if match:
      return match["run"]
  return None


def _names(output: str) -> list:
  """The names directly inside the folder (files, folders, prefixes)."""
  if not paths.is_remote(output):
    try:
      return sorted(os.listdir(output))
    except FileNotFoundError:
      return []
    except NotADirectoryError:
      raise FolderError(f"--output {output} is a file, not a folder") from None
  prefix = output.rstrip("/") + "/"
  found = FileSystems.match([prefix + "**"])[0].metadata_list
  return sorted({m.path[len(prefix):].split("/", 1)[0] for m in found
                 if m.path.startswith(prefix)})


def _listed(manifest: Optional[dict], kind: Optional[str] = None) -> list:
  """The manifest's shard entries ({"name", "rows"}), of one kind or all."""
  files = (manifest or {}).get("files")
  if not isinstance(files, dict):
    return []
  kinds = [kind] if kind else [outputs.PREDICTIONS_PREFIX,
                               outputs.ERRORS_PREFIX]
  entries = []
  for name in kinds:
    for entry in files.get(name) or []:
      if isinstance(entry, dict) and _shard_name(entry.get("name")):
        entries.append(entry)
  return entries


def _shard_name(name) -> bool:
  """A manifest lists shards of ours, inside its own folder, and nothing
  else: a name that is not one is ignored, never read nor deleted."""
  return isinstance(name, str) and bool(_SHARD_KINDS.match(name))


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
    if name in (outputs.MANIFEST_FILE, LOCK_FILE):
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


def _read_lock_record(output: str) -> Optional[dict]:
  """The lock's record, to tell which run's files are ours (a killed run's
  are, for the run that will take its lock over)."""
  try:
    with paths.open_file(paths.join(output, LOCK_FILE)) as handle:
      record = json.loads(handle.read(65536).decode("utf-8"))
  except Exception:  # pylint: disable=broad-except
    return None
  return record if isinstance(record, dict) else None


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
    state.lock = _read_lock_record(output)
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
          skip_existing: bool = False) -> None:
  """Refuses, in one line, a folder this run may not write to.

  A folder already holding this model's results is refused too unless the
  user says what to do with them: keep them (--skip_existing) or replace
  them (--overwrite); a re-run never replaces them silently.
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


def result_files(output: str) -> dict:
  """The shard paths of the folder's current result set, by kind.

  With a manifest, exactly the files it lists. A folder without one (written
  by hand or by an older version) is read by its file names. Raises
  outputs.ManifestError for a damaged manifest.
  """
  manifest = outputs.read_manifest(output)
  if manifest is not None and isinstance(manifest.get("files"), dict):
    return {kind: [paths.join(output, entry["name"])
                   for entry in _listed(manifest, kind)]
            for kind in (outputs.PREDICTIONS_PREFIX, outputs.ERRORS_PREFIX)}
  return {
      outputs.PREDICTIONS_PREFIX: paths.match_paths(
          outputs.predictions_glob(output)),
      outputs.ERRORS_PREFIX: paths.match_paths(outputs.errors_glob(output)),
  }


def listed_rows(manifest: Optional[dict]) -> dict:
  """{file name: row count} as the manifest records them."""
  return {entry["name"]: entry.get("rows") for entry in _listed(manifest)}


def _footer_rows(path: str) -> int:
  with FileSystems.open(
      path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
    return pq.ParquetFile(handle).metadata.num_rows


def run_shards(output: str, run_id: str) -> dict:
  """This run's shards by kind, checked complete (every SSSSS of NNNNN)."""
  found = {outputs.PREDICTIONS_PREFIX: [], outputs.ERRORS_PREFIX: []}
  for name in _names(output):
    match = _SHARD.match(name)
    if match and match["run"] == run_id:
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
  deletes. `state` is the folder as it was when the run took the lock.
  """
  output = state.output
  shards = run_shards(output, run_id)
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
      name for name in set(state.names).union(_names(output))
      if name not in listed and name not in (outputs.MANIFEST_FILE, LOCK_FILE)
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


def _row_totals(files: dict) -> dict:
  return {kind: sum(entry.get("rows") or 0 for entry in entries)
          for kind, entries in files.items()}


def commit(output: str, manifest: dict) -> None:
  """Writes the manifest (the commit point), then deletes what it retired."""
  outputs.write_manifest(output, manifest)
  delete_entries(output, manifest["retired"])


# The lock ---------------------------------------------------------------------


def _process_started(pid: int) -> Optional[str]:
  """When a process started (Linux /proc), to tell a reused pid apart."""
  try:
    with open(f"/proc/{pid}/stat", "rb") as handle:
      fields = handle.read().rsplit(b")", 1)[1].split()
    return fields[19].decode()
  except (OSError, IndexError):
    return None


def _alive(record: dict) -> bool:
  """Whether the process that wrote a lock record may still be running."""
  if record.get("host") != socket.gethostname():
    return True  # Another machine's process cannot be checked from here.
  pid = record.get("pid")
  if not isinstance(pid, int) or pid <= 0:
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass
  started = record.get("process_started")
  return started is None or _process_started(pid) in (None, started)


class _LocalLock:
  """The lock file on a local disk: created by a hard link, which fails when
  the name exists, so the file never exists half-written."""

  def __init__(self, output: str, run_id: str):
    self._output = output
    self._run_id = run_id
    self._path = paths.join(output, LOCK_FILE)

  def create(self, data: bytes):
    """Returns a token for `delete` if the lock was created, else None."""
    os.makedirs(self._output, exist_ok=True)
    temporary = paths.join(self._output, f"{LOCK_FILE}.{self._run_id}.tmp")
    with open(temporary, "wb") as handle:
      handle.write(data)
      handle.flush()
      os.fsync(handle.fileno())
    try:
      os.link(temporary, self._path)
    except FileExistsError:
      return None
    finally:
      os.unlink(temporary)
    return data

  def read(self):
    """(bytes, token) of the current lock, or None when there is none."""
    try:
      with open(self._path, "rb") as handle:
        data = handle.read(65536)
    except FileNotFoundError:
      return None
    return data, data

  def delete(self, token) -> bool:
    """Deletes the lock if it is still the one `token` names."""
    moved = paths.join(self._output, f"{LOCK_FILE}.{self._run_id}.stale")
    try:
      os.rename(self._path, moved)
    except FileNotFoundError:
      return False
    with open(moved, "rb") as handle:
      same = handle.read(65536) == token
    if not same:
      # Another run's lock was moved aside: put it back.
      with contextlib.suppress(FileExistsError):
        os.link(moved, self._path)
    os.unlink(moved)
    return same


class _GcsLock:
  """The lock object on gs://, with generation preconditions: created only
  if absent (if_generation_match=0), deleted only if unchanged."""

  def __init__(self, output: str, client=None):
    bucket, _, prefix = output[len("gs://"):].partition("/")
    self._bucket_name = bucket
    self._name = (prefix.rstrip("/") + "/" if prefix else "") + LOCK_FILE
    self._client = client

  def _bucket(self):
    if self._client is None:
      from google.cloud import storage  # pylint: disable=import-outside-toplevel
      self._client = storage.Client()
    return self._client.bucket(self._bucket_name)

  def create(self, data: bytes):
    from google.api_core import exceptions  # pylint: disable=import-outside-toplevel
    blob = self._bucket().blob(self._name)
    try:
      blob.upload_from_string(data, content_type="application/json",
                              if_generation_match=0)
    except exceptions.PreconditionFailed:
      return None
    return blob.generation

  def read(self):
    from google.api_core import exceptions  # pylint: disable=import-outside-toplevel
    blob = self._bucket().get_blob(self._name)
    if blob is None:
      return None
    try:
      data = blob.download_as_bytes(if_generation_match=blob.generation)
    except (exceptions.NotFound, exceptions.PreconditionFailed):
      return None
    return data, blob.generation

  def delete(self, token) -> bool:
    from google.api_core import exceptions  # pylint: disable=import-outside-toplevel
    try:
      self._bucket().blob(self._name).delete(if_generation_match=token)
    except (exceptions.NotFound, exceptions.PreconditionFailed):
      return False
    return True


class OutputLock:
  """`_run.lock`: one run at a time in an output folder.

  `acquire` returns the run ids whose leftovers this run inherits from the
  killed run whose lock it took over; `release` deletes the lock if it is
  still this run's. `storage_client` stands in for google.cloud.storage's
  Client on gs:// (tests pass a fake one).
  """

  _ATTEMPTS = 3

  def __init__(self, output: str, run_id: str, storage_client=None):
    self.output = output
    self.run_id = run_id
    if not paths.is_remote(output):
      self._backend = _LocalLock(output, run_id)
    elif output.startswith("gs://"):
      self._backend = _GcsLock(output, storage_client)
    else:
      raise FolderError(f"--output {output}: only local folders and gs:// "
                        "can be locked against a second run")
    self._token = None
    self.inherited = []

  def _record(self) -> bytes:
    return (json.dumps({
        "run_id": self.run_id,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "process_started": _process_started(os.getpid()),
        "locked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "claims": self.inherited,
    }, indent=2) + "\n").encode()

  def acquire(self) -> list:
    lock = paths.join(self.output, LOCK_FILE)
    for _ in range(self._ATTEMPTS):
      self._token = self._backend.create(self._record())
      if self._token is not None:
        return self.inherited
      current = self._backend.read()
      if current is None:
        continue  # Released in the meantime: try again.
      data, token = current
      try:
        holder = json.loads(data.decode("utf-8"))
        if not isinstance(holder, dict):
          raise ValueError("not an object")
      except ValueError:
        raise FolderError(
            f"--output {self.output} is locked by {lock}, which is not a lock "
            f"this tool wrote; if no run is writing there, delete {lock} and "
            "run again") from None
      if _alive(holder):
        raise FolderError(
            f"--output {self.output} is in use by run {holder.get('run_id')} "
            f"(pid {holder.get('pid')} on {holder.get('host')}, since "
            f"{holder.get('locked_at')}); wait for it, or, if it is no longer "
            f"running, delete {lock} and run again")
      if self._backend.delete(token):
        # The killed run's files, and those it had inherited, are ours now.
        claims = [holder.get("run_id")] + list(holder.get("claims") or [])
        self.inherited = sorted({run for run in self.inherited + claims
                                 if isinstance(run, str)})
    raise FolderError(f"--output {self.output}: could not take {lock} after "
                      f"{self._ATTEMPTS} attempts; another run is starting "
                      "there")

  def release(self) -> None:
    if self._token is not None:
      self._backend.delete(self._token)
      self._token = None
