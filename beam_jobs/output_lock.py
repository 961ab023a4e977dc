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
import socket
import time
from typing import Optional

from imagebatch import paths

LOCK_FILE = "_run.lock"


class FolderError(ValueError):
  """An output folder this run may not write to, as it stands."""


def read_record(output: str) -> Optional[dict]:
  """The lock's record, to tell which run's files are ours (a killed run's
  are, for the run that will take its lock over)."""
  try:
    with paths.open_file(paths.join(output, LOCK_FILE)) as handle:
      record = json.loads(handle.read(65536).decode("utf-8"))
  except Exception:  # pylint: disable=broad-except
    return None
  return record if isinstance(record, dict) else None


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
