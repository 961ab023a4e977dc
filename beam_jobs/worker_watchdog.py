"""Local worker processes end with the launcher that started them.

With `--direct_running_mode multi_processing` the local runner starts its
SDK worker processes (through a shell), and they talk to the launcher over
gRPC. Killed with SIGKILL, a launcher cannot stop them, and a worker that
was starting, or waiting for work, lived on for about two minutes, holding
a model. A worker cannot watch for that itself soon enough: it waits on the
launcher's channels before it runs any code of ours.

So while such a run works, a watchdog process waits beside the launcher: a
bare interpreter reading a pipe only the launcher holds open. The
launcher's processes carry its identity in an environment variable they
inherit; when the pipe closes without the launcher saying it is done (the
launcher died, or failed), the watchdog kills every process that carries
that identity, and exits. Linux only (it finds them through /proc); only
on local runners, whose workers share the launcher's machine.
"""

import contextlib
import os
import subprocess
import sys

# "PID:START": the launcher's process id and start time, so that a process
# of an earlier launcher with a reused pid is never taken for one of ours.
LAUNCHER_VARIABLE = "BEAM_JOBS_LAUNCHER"
_DONE = b"done"

# The watchdog's program: read until the launcher closes the pipe; unless
# it said it was done, kill the processes that carry its identity, and look
# again until a look finds none (a shell may have been starting a worker).
_WATCHDOG = r"""
import os, signal, sys, time
marker = ("%s=%s\0" % (sys.argv[1], sys.argv[2])).encode()
said = b""
while True:
    chunk = os.read(0, 64)
    if not chunk:
        break
    said += chunk
if said.strip() == sys.argv[3].encode():
    sys.exit(0)
for attempt in range(20):
    killed = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open("/proc/%s/stat" % entry, "rb") as handle:
                if handle.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue
            with open("/proc/%s/environ" % entry, "rb") as handle:
                if marker not in handle.read() + b"\0":
                    continue
            os.kill(int(entry), signal.SIGKILL)
            killed += 1
        except (OSError, IndexError):
            pass
    if attempt >= 2 and not killed:
        break
    time.sleep(0.25)
"""


def _identity(pid: int) -> str:
  try:
    with open(f"/proc/{pid}/stat", "rb") as handle:
      started = handle.read().rsplit(b")", 1)[1].split()[19].decode()
  except (OSError, IndexError):
    started = ""
  return f"{pid}:{started}"


def _starts_workers(options, local: bool) -> bool:
  # pylint: disable=import-outside-toplevel
  from apache_beam.options.pipeline_options import DirectOptions
  return local and os.path.isdir("/proc") and (
      options.view_as(DirectOptions).direct_running_mode ==
      "multi_processing")


@contextlib.contextmanager
def workers_end_with_this_process(options, local: bool):
  """While the pipeline runs, a watchdog kills the worker processes a
  local runner starts if this process dies (or the run fails) before
  they end; a run that ends well leaves them to the runner."""
  if not _starts_workers(options, local):
    yield
    return
  identity = _identity(os.getpid())
  environment = {name: value for name, value in os.environ.items()
                 if name != LAUNCHER_VARIABLE}
  watchdog = subprocess.Popen(
      [sys.executable, "-I", "-S", "-c", _WATCHDOG, LAUNCHER_VARIABLE,
       identity, _DONE.decode()],
      stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL, env=environment, start_new_session=True)
  previous = os.environ.get(LAUNCHER_VARIABLE)
  os.environ[LAUNCHER_VARIABLE] = identity
  done = False
  try:
    yield
    done = True
  finally:
    if previous is None:
      os.environ.pop(LAUNCHER_VARIABLE, None)
    else:
      os.environ[LAUNCHER_VARIABLE] = previous
    with contextlib.suppress(OSError):
      if done:
        watchdog.stdin.write(_DONE)
      watchdog.stdin.close()
    with contextlib.suppress(subprocess.TimeoutExpired):
      watchdog.wait(timeout=10)
