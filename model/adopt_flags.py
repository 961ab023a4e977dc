"""The values of model.adopt's flags, parsed and checked: class names (a
list or a file), number lists and sizes. Each problem is an AdoptError of
one line naming the flag."""

import json
import os
from typing import Optional

from model.model_formats import AdoptError

# A --class_names value with one of these endings, or a path separator,
# names a file.
CLASS_NAME_FILE_SUFFIXES = (".txt", ".json", ".csv")
# A class-names file holds one name a line; 100,000 classes fit easily.
MAX_CLASS_NAMES_BYTES = 16 << 20


def parse_class_names(value: str) -> list:
  """A comma-separated list, or a file: one name per line, or a JSON list.
  A value that looks like a file name (a path separator, or a .txt, .json
  or .csv ending) must be a file: never a class named "classes.txt"."""
  if os.path.isfile(value):
    size = os.path.getsize(value)
    if size > MAX_CLASS_NAMES_BYTES:
      raise AdoptError(f"--class_names {value} is {size:,} bytes, above the "
                       f"limit of {MAX_CLASS_NAMES_BYTES:,}")
    try:
      with open(value, encoding="utf-8") as handle:
        text = handle.read()
    except UnicodeDecodeError:
      raise AdoptError(f"--class_names {value} is not UTF-8 text") from None
    if text.lstrip().startswith("["):
      try:
        names = json.loads(text)
      except json.JSONDecodeError as error:
        raise AdoptError(f"--class_names {value}: not a JSON list: "
                         f"{error}") from None
      if not isinstance(names, list):
        raise AdoptError(f"--class_names {value}: expected a JSON list")
      names = [str(name) for name in names]
    else:
      names = [line.strip() for line in text.splitlines() if line.strip()]
  elif os.path.exists(value):
    raise AdoptError(f"--class_names {value} is not a regular file (a "
                     "folder?); expected a file of names")
  elif ("/" in value or os.sep in value or
        value.lower().endswith(CLASS_NAME_FILE_SUFFIXES)):
    raise AdoptError(f"--class_names {value}: no such file (a list of names "
                     "is comma-separated: --class_names cat,dog)")
  else:
    names = [name.strip() for name in value.split(",")]
  if any(not name for name in names):
    raise AdoptError("--class_names has an empty name")
  duplicates = sorted({name for name in names if names.count(name) > 1})
  if duplicates:
    raise AdoptError(f"--class_names repeats {', '.join(duplicates)}")
  return names


def parse_numbers(flag: str, value: Optional[str]) -> Optional[list]:
  if value is None:
    return None
  try:
    return [float(v) for v in value.split(",")]
  except ValueError:
    raise AdoptError(f"--{flag} {value!r}: expected comma-separated "
                     "numbers") from None


def parse_image_size(value: Optional[str], flag: str = "image_size",
                     square: bool = True):
  """HEIGHT,WIDTH (or HxW) as a pair; N as (N, N), or with `square` False
  as the int N (`--resize N`: the shorter side)."""
  if value is None:
    return None
  parts = value.replace("x", ",").split(",")
  try:
    size = tuple(int(p) for p in parts)
  except ValueError:
    size = ()
  if len(size) not in (1, 2) or min(size) < 1:
    raise AdoptError(f"--{flag} {value!r}: expected HEIGHT,WIDTH or N")
  if len(size) == 1:
    return size * 2 if square else size[0]
  return size
