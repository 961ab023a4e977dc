"""`_run.lock`: one run at a time in an output folder.

The lock is created exclusively: a hard link on a local disk, which fails
if the name exists, so the file never exists half-written; an object written
with if_generation_match=0 on gs://. A lock left by a killed run on this host
(its process is gone) is taken over, and the run that takes it over inherits
the killed run's files to clean up (beam_jobs/output_folder.py).
"""

import contextlib
import json
import os
import re
import socket
import time
from typing import Optional

from beam_jobs import records
from imagebatch import paths

LOCK_FILE = "_run.lock"
# A run's id: when it started (UTC) and six random hex digits.
RUN_ID = r"\d{8}T\d{6}-[0-9a-f]{6}"
# The files a local lock is made and taken over through, named for the run
# that writes them: `_run.lock.RUN.tmp` holds a run's record until it is
# linked as the lock, `_run.lock.RUN.stale` a lock moved aside to be
# deleted. A run killed in between leaves them; they are ours whatever run
# they name, and the next run that locks the folder cleans them up
# (`OutputLock.acquire`).
LOCK_LEFTOVER = re.compile(
    rf"^{re.escape(LOCK_FILE)}\.(?P<run>{RUN_ID})\.(?P<step>tmp|stale)$")
# A lock record is a few hundred bytes.
MAX_LOCK_BYTES = 65536
LOCK_SCHEMA = records.Fields(
    run_id=str, host=str, pid=int, process_started=(str, records.NONE),
    locked_at=str, claims=records.ListOf(str))


class FolderError(ValueError):
  """An output folder this run may not write to, as it stands."""


def parse_record(data: bytes, path: str) -> dict:
  """A lock record from its bytes; records.RecordError if it is not one
  this tool wrote (not JSON, too deep, a field of the wrong type)."""
  return records.check(records.parse(data, path), LOCK_SCHEMA, path)


def read_record(output: str) -> Optional[dict]:
  """The lock's record, to tell which run's files are ours (a killed run's
  are, for the run that will take its lock over); None when there is no
  lock, or none this tool wrote."""
  path = paths.join(output, LOCK_FILE)
  try:
    data = records.read_bytes(path, MAX_LOCK_BYTES)
    return None if data is None else parse_record(data, path)
  except records.RecordError:
    return None


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


def _write_synced(path: str, data: bytes) -> None:
  """Writes a new file to disk (never through a link at its name)."""
  descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC |
                       os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
  with os.fdopen(descriptor, "wb") as handle:
    handle.write(data)
    handle.flush()
    os.fsync(handle.fileno())


class _LocalLock:
  """The lock file on a local disk: created by a hard link, which fails when
  the name exists, so the file never exists half-written."""

  def __init__(self, output: str, run_id: str):
    self._output = output
    self._run_id = run_id
    self._path = paths.join(output, LOCK_FILE)

  def _own(self, step: str) -> str:
    return paths.join(self._output, f"{LOCK_FILE}.{self._run_id}.{step}")

  def create(self, data: bytes):
    """Returns a token for `delete` if the lock was created, else None."""
    temporary = self._own("tmp")
    try:
      os.makedirs(self._output, exist_ok=True)
      _write_synced(temporary, data)
      os.link(temporary, self._path)
    except (FileExistsError, FileNotFoundError):
      # The lock exists; or another run cleaned our record away as a dead
      # run's leftover before we linked it: the caller looks again.
      return None
    except OSError as error:
      # A full disk, say: nothing of this run is left behind.
      raise FolderError(
          f"--output {self._output}: cannot write the lock {LOCK_FILE} "
          f"({error.strerror or error}); nothing was written") from None
    finally:
      with contextlib.suppress(OSError):
        os.unlink(temporary)
    return data

  def read(self):
    """(bytes, token) of the current lock, or None when there is none.
    Raises records.RecordError for a lock that is not a regular file."""
    data = records.read_bytes(self._path, MAX_LOCK_BYTES)
    return None if data is None else (data, data)

  def delete(self, token) -> bool:
    """Deletes the lock if it is still the one `token` names."""
    moved = self._own("stale")
    try:
      os.rename(self._path, moved)
    except FileNotFoundError:
      return False
    try:
      same = records.read_bytes(moved, MAX_LOCK_BYTES) == token
    except records.RecordError:
      same = False
    if not same:
      # Another run's lock was moved aside: put it back.
      _put_back(moved, self._path)
    with contextlib.suppress(FileNotFoundError):
      os.unlink(moved)
    return same

  def clean_leftovers(self) -> None:
    """Cleans up after runs killed while locking: a lock moved aside whose
    run is alive is put back (its run goes on, and holds the folder); a
    dead run's record, or one that is no record, is deleted. The record of
    a live run that is locking right now is left to it."""
    try:
      names = os.listdir(self._output)
    except OSError:
      return
    for name in sorted(names):
      match = LOCK_LEFTOVER.match(name)
      if not match or match["run"] == self._run_id:
        continue
      path = paths.join(self._output, name)
      try:
        data = records.read_bytes(path, MAX_LOCK_BYTES)
        record = None if data is None else parse_record(data, path)
      except records.RecordError:
        record = None
      if data is None:
        continue  # Gone in the meantime.
      if record is not None and _alive(record):
        if match["step"] == "tmp":
          continue
        _put_back(path, self._path)
      with contextlib.suppress(FileNotFoundError, IsADirectoryError,
                               PermissionError):
        os.unlink(path)


def _put_back(moved: str, lock: str) -> None:
  """Links a lock that was moved aside back to its name, unless a lock is
  there already."""
  with contextlib.suppress(OSError):
    os.link(moved, lock)


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
    try:
      blob = self._bucket().blob(self._name)
      blob.upload_from_string(data, content_type="application/json",
                              if_generation_match=0)
    except exceptions.PreconditionFailed:
      return None
    except Exception as error:  # pylint: disable=broad-except
      # No credentials, no access to the bucket, say: one line.
      text = str(error).strip().splitlines()
      raise FolderError(
          f"--output gs://{self._bucket_name}/{self._name}: cannot write "
          f"the lock ({type(error).__name__}: {text[0][:300] if text else ''})"
          "; nothing was written") from None
    return blob.generation

  def clean_leftovers(self) -> None:
    """Object writes are atomic: a gs:// lock leaves nothing behind."""

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

  As a context manager: `with OutputLock(output, run_id) as lock:` takes the
  lock (`lock.inherited` names the runs whose leftovers this run inherits
  from a killed run whose lock it took over) and releases it on the way out,
  unless `keep()` was called: a run that could not clean up after itself
  leaves the lock, so that the next run does. `storage_client` stands in for
  google.cloud.storage's Client on gs:// (tests pass a fake one).
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
    self._keep = False
    self.inherited = []

  def __enter__(self) -> "OutputLock":
    self.acquire()
    return self

  def __exit__(self, *exc_info) -> None:
    if not self._keep:
      self.release()

  def keep(self) -> None:
    """Leaves the lock in place when the `with` block ends."""
    self._keep = True

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
    self._backend.clean_leftovers()
    for _ in range(self._ATTEMPTS):
      self._token = self._backend.create(self._record())
      if self._token is not None:
        return self.inherited
      try:
        current = self._backend.read()
        if current is None:
          continue  # Released in the meantime: try again.
        data, token = current
        holder = parse_record(data, lock)
      except records.RecordError as error:
        raise FolderError(
            f"--output {self.output} is locked by {lock}, which is not a lock "
            f"this tool wrote ({error}); if no run is writing there, delete "
            f"{lock} and run again") from None
      if _alive(holder):
        raise FolderError(
            f"--output {self.output} is in use by run {holder.get('run_id')} "
            f"(pid {holder.get('pid')} on {holder.get('host')}, since "
            f"{holder.get('locked_at')}); wait for it, or, if it is no longer "
            f"running, delete {lock} and run again")
      if self._backend.delete(token):
        # The killed run's files, and those it had inherited, are ours now.
        claims = [holder.get("run_id")] + holder.get("claims", [])
        self.inherited = sorted({run for run in self.inherited + claims
                                 if isinstance(run, str)})
    raise FolderError(f"--output {self.output}: could not take {lock} after "
                      f"{self._ATTEMPTS} attempts; another run is starting "
                      "there")

  def release(self) -> None:
    if self._token is not None:
      self._backend.delete(self._token)
      self._token = None
