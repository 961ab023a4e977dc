"""What tools.report may write: the files of its own report folders, and
nothing else.

A report folder is one the report made: it writes MARKER into it first. The
report writes into `--out` only when it is new, empty or marked; a folder
holding anything else, without the marker, is refused in one line, so a
user's own index.html or plots are never replaced. In a marked folder it
writes only its own names (OWNED), each to a temporary file of its own that
is then renamed over the name, so a link planted there is replaced, never
followed; a name of its own that is not a regular file (a folder, a link, a
FIFO) is refused. Other files a user adds to a report folder stay.
"""

import os
import re
import stat

MARKER = ".tools-report"
MARKER_TEXT = ("This folder holds a report of python -m tools.report, which "
               "replaces its index.html and plots on every run and leaves "
               "every other file alone.\n")
# The temporary files of an interrupted write: ours, named for their file.
_TEMPORARY = re.compile(r"\.(?P<name>[\w.-]+)\.\d+\.tmp")


class FolderError(ValueError):
  """An --out folder the report may not write into."""


def _is_regular(path: str) -> bool:
  try:
    return stat.S_ISREG(os.lstat(path).st_mode)
  except FileNotFoundError:
    return False


def claim(out: str, owned: list) -> None:
  """Makes `out` a report folder (creating it and its marker), or refuses
  it: a folder without the marker that holds anything, or a marked folder
  where one of the `owned` names is not a regular file."""
  if os.path.lexists(out) and not os.path.isdir(out):
    raise FolderError(f"--out {out} is not a folder")
  try:
    os.makedirs(out, exist_ok=True)
    entries = sorted(os.listdir(out))
  except OSError as error:
    raise FolderError(f"--out {out} cannot be used: {error.strerror}") from None
  marker = os.path.join(out, MARKER)
  if MARKER in entries:
    if not _is_regular(marker):
      raise FolderError(f"--out {out}: {MARKER} is not a file this tool "
                        "wrote; name a new or empty folder for the report")
  elif entries:
    shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    raise FolderError(
        f"--out {out} holds files tools.report did not write ({shown}); name "
        "a new or empty folder for the report (a report folder holds "
        f"{MARKER})")
  else:
    write(out, MARKER, MARKER_TEXT.encode())
  for name in owned:
    path = os.path.join(out, name)
    if os.path.lexists(path) and not _is_regular(path):
      raise FolderError(f"--out {out}: {name} is not a regular file; this "
                        "tool replaces only the files it wrote")
  for name in entries:
    match = _TEMPORARY.fullmatch(name)
    if match and match.group("name") in owned + [MARKER]:
      remove(out, name)


def write(out: str, name: str, data: bytes) -> str:
  """Writes `data` as `name` in `out`: to a new temporary file, renamed over
  the name."""
  path = os.path.join(out, name)
  temporary = os.path.join(out, f".{name}.{os.getpid()}.tmp")
  descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL |
                       os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
  try:
    with os.fdopen(descriptor, "wb") as handle:
      handle.write(data)
    os.replace(temporary, path)
  except BaseException:
    if _is_regular(temporary):
      os.remove(temporary)
    raise
  return path


def remove(out: str, name: str) -> None:
  """Removes `name` from `out` if it is a regular file (never a link)."""
  path = os.path.join(out, name)
  if _is_regular(path):
    os.remove(path)
