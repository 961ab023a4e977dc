"""Where `model.adopt` writes, and what it may replace there.

Adopting never deletes or overwrites its own source, wherever `--output`
points, and never replaces a file it did not write:

* `check_output` refuses, before anything is read or written, an output
  that is the source or inside it; an output that holds the source, at any
  depth, with links resolved (`DIR/model.keras --output DIR`, `model.tflite
  --output .`, `DIR/saved_model --output DIR`); an output whose model file
  is the source under another name (a link, or a hard link: the same
  inode); an output that is not a folder; and a folder holding files named
  as a model folder's (MODEL_NAMES) that is not a model folder this project
  wrote, that is, one without a valid model card: those files are someone
  else's.
* `StagedFolder` builds the new folder in a hidden folder inside the output
  and commits it by renames. The output's old model files move into the
  staging folder, the new ones take their place, and the card comes last;
  until then the old card does not describe the files, so `predict`
  refuses the folder. A failed adoption leaves the output as it was. Nothing
  in the output is ever opened for writing, so a link there is replaced,
  never written through.
"""

import os
import shutil
import tempfile

from model import card as card_lib
from model.model_formats import AdoptError

# What a model folder holds, card first (model/card.py).
MODEL_NAMES = (card_lib.CARD_FILE, card_lib.MODEL_FILE, card_lib.TFLITE_FILE,
               card_lib.ONNX_FILE, card_lib.SAVED_MODEL_DIR)
# The staging folder's name starts with this; it is removed when adopting
# ends, and left (holding the old model files) only if the process dies.
STAGING_PREFIX = ".model.adopt-"
# A source folder (a SavedModel) is walked this far for its files' inodes.
_MAX_SOURCE_FILES = 100_000


def _within(path: str, folder: str) -> bool:
  """Whether real path `path` is `folder` or below it."""
  return os.path.commonpath([path, folder]) == folder


def _ancestors(path: str):
  """`path` and each folder above it."""
  while True:
    yield path
    parent = os.path.dirname(path)
    if parent == path:
      return
    path = parent


def _same_place(first: str, second: str) -> bool:
  try:
    return os.path.samefile(first, second)
  except OSError:
    return False


def _inside(path: str, folder: str) -> bool:
  """Whether `path` is `folder` or inside it, by real path or by identity
  (a bind mount or another name for the same folder)."""
  if _within(os.path.realpath(path), os.path.realpath(folder)):
    return True
  if not os.path.exists(folder):
    return False
  return any(_same_place(above, folder)
             for above in _ancestors(os.path.realpath(path))
             if os.path.exists(above))


def _inodes(path: str) -> set:
  """(device, inode) of a file, or of every regular file below a folder
  (links not followed)."""
  found = set()
  if os.path.isfile(path) and not os.path.islink(path):
    status = os.stat(path)
    return {(status.st_dev, status.st_ino)}
  if not os.path.isdir(path) or os.path.islink(path):
    return found
  for root, _, names in os.walk(path):
    for name in names:
      status = os.lstat(os.path.join(root, name))
      found.add((status.st_dev, status.st_ino))
      if len(found) >= _MAX_SOURCE_FILES:
        return found
  return found


def _not_ours(output: str):
  """Why the folder is not a model folder this project wrote, or None."""
  card_path = os.path.join(output, card_lib.CARD_FILE)
  if not os.path.lexists(card_path):
    return f"no {card_lib.CARD_FILE}"
  if os.path.islink(card_path) or not os.path.isfile(card_path):
    return f"its {card_lib.CARD_FILE} is not a regular file"
  try:
    card_lib.load_card(output)
  except Exception as error:  # pylint: disable=broad-except
    text = str(error).strip().splitlines()
    return (f"its {card_lib.CARD_FILE} is not a model card "
            f"({(text[0] if text else type(error).__name__)[:200]})")
  return None


def check_output(source: str, output: str) -> None:
  """Refuses, in one line, an `output` that would cost the user a file:
  see the module docstring. Reads nothing but names and inodes."""
  if _inside(output, source):
    raise AdoptError(f"--output {output} is the source {source} or inside "
                     "it; pass a folder elsewhere")
  if _inside(source, output):
    raise AdoptError(
        f"--output {output} holds the source {source}: adopting replaces "
        "the model files of its output folder, so it never writes where "
        "its source is; pass another folder")
  if not os.path.lexists(output):
    return
  if not os.path.isdir(output):
    raise AdoptError(f"--output {output} is not a folder")
  present = [name for name in MODEL_NAMES
             if os.path.lexists(os.path.join(output, name))]
  if not present:
    return
  problem = _not_ours(output)
  if problem:
    raise AdoptError(
        f"--output {output} holds {', '.join(present)} but {problem}, so "
        "they are not files model.adopt or model.train wrote, and adopting "
        "would replace them; pass a new or empty folder, or move them away")
  source_files = _inodes(source)
  real_source = os.path.realpath(source)
  for name in present:
    target = os.path.join(output, name)
    real = os.path.realpath(target)
    if (_within(real, real_source) or _within(real_source, real) or
        _inodes(target) & source_files):
      raise AdoptError(
          f"--output {output}: its {name} is the source {source} under "
          "another name (a link or a hard link), which adopting would "
          "replace; pass another folder")


class StagedFolder:
  """The new model folder, built in `path` (inside the output) and moved
  into place by `commit`; removed on exit however adopting ended."""

  def __init__(self, output: str):
    self.created = not os.path.lexists(output)
    os.makedirs(output, exist_ok=True)
    self.output = output
    self.path = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=output)
    self.committed = False

  def __enter__(self) -> "StagedFolder":
    return self

  def __exit__(self, *exc_info) -> None:
    shutil.rmtree(self.path, ignore_errors=True)
    if self.created and not self.committed:
      # A folder made for an adoption that failed goes too, if still empty.
      try:
        os.rmdir(self.output)
      except OSError:
        pass

  def commit(self, card_json: str) -> None:
    """Moves the staged model files into the output, the output's old ones
    out (into the staging folder, removed on exit), and the card last."""
    retired = os.path.join(self.path, "retired")
    os.mkdir(retired)
    for name in MODEL_NAMES[1:]:
      if os.path.lexists(os.path.join(self.output, name)):
        os.replace(os.path.join(self.output, name),
                   os.path.join(retired, name))
      if os.path.lexists(os.path.join(self.path, name)):
        os.replace(os.path.join(self.path, name),
                   os.path.join(self.output, name))
    staged_card = os.path.join(self.path, card_lib.CARD_FILE)
    with open(staged_card, "w", encoding="utf-8") as handle:
      handle.write(card_json)
    os.replace(staged_card, os.path.join(self.output, card_lib.CARD_FILE))
    self.committed = True
