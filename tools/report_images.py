"""What tools.report may open to draw a prediction's image, and how.

A row's `id` is data, never a path: the report reads the row's `source`,
the URI the pipeline read. But the rows come from an output folder, and
folders are shared (a bucket, a colleague's run), so `source` is untrusted
too. The report therefore opens a source only when

* it is a local path (a gs:// or other remote source is not fetched: without
  a network that would wait, and a report is drawn where it runs);
* it lies, with every link resolved, under an allowed root: the input folder
  the run's manifest records (the fixed part of a folder or glob, the folder
  of an input list), or the folders the user names with --images_root;
  --no_images allows none;
* it is a regular file (never a FIFO, device or folder: opened without
  blocking and checked again once open) of at most MAX_IMAGE_BYTES;

and decodes it as the pipeline does (`preprocessing.decode_image`, with the
same --max_image_pixels limit), to the model's input size, at most
MAX_TILE_SIDE a side. A Parquet input's row is read from its shard, one row
group of at most MAX_ROW_GROUP_BYTES. Anything else is a placeholder tile
that says why: the report never fails on an image.
"""

import dataclasses
import os
import stat
from typing import Optional

import numpy as np

from imagebatch import paths
from model import image_limits
from model import preprocessing

# Bytes of one image file the report reads at most.
MAX_IMAGE_BYTES = 128 * 1024**2
# Bytes of one Parquet row group (as its footer says) read at most.
MAX_ROW_GROUP_BYTES = 256 * 1024**2
# A tile's longer side at most, in pixels.
MAX_TILE_SIDE = 256
# The tile's shape when the manifest does not say the model's.
DEFAULT_TILE = (64, 64, 3)
_GLOB_CHARACTERS = "*?["


class NotDrawn(Exception):
  """Why one image is a placeholder; its message is shown on the tile."""


@dataclasses.dataclass(frozen=True)
class ImagePolicy:
  """Where the report may read images from, and how it decodes them.

  `roots` are real paths (links resolved); an empty tuple allows nothing.
  """
  roots: tuple
  input_format: str = "images"
  id_column: Optional[str] = "id"
  image_column: str = "image"
  input_shape: tuple = DEFAULT_TILE
  max_pixels: int = image_limits.DEFAULT_MAX_IMAGE_PIXELS

  @property
  def tile_shape(self) -> tuple:
    height, width, channels = self.input_shape
    scale = min(1.0, MAX_TILE_SIDE / max(height, width))
    return (max(1, round(height * scale)), max(1, round(width * scale)),
            channels)


def _fixed_folder(pattern: str) -> Optional[str]:
  """The folder a local input names: a folder itself, the folder of a file,
  or the part of a glob before its first wildcard."""
  if not pattern or paths.is_remote(pattern):
    return None
  parts = pattern.split(os.sep)
  fixed = []
  for part in parts:
    if any(character in part for character in _GLOB_CHARACTERS):
      break
    fixed.append(part)
  folder = os.sep.join(fixed) or ("/" if pattern.startswith("/") else ".")
  if len(fixed) == len(parts) and not os.path.isdir(folder):
    folder = os.path.dirname(folder) or "."
  return folder


def _text(value) -> Optional[str]:
  return value if isinstance(value, str) and value else None


def _shape(model: dict) -> tuple:
  shape = model.get("input_shape") if isinstance(model, dict) else None
  if (isinstance(shape, list) and len(shape) == 3 and
      all(isinstance(side, int) and not isinstance(side, bool) and
          1 <= side <= 65536 for side in shape) and shape[2] in (1, 3)):
    return tuple(shape)
  return DEFAULT_TILE


def policy_for(manifest, images_roots: Optional[list] = None,
               no_images: bool = False) -> ImagePolicy:
  """The policy for a run: its manifest's input folder (or `images_roots`),
  decoding and columns, each field checked for its type."""
  manifest = manifest if isinstance(manifest, dict) else {}
  arguments = manifest.get("arguments")
  arguments = arguments if isinstance(arguments, dict) else {}
  given_input = _text(arguments.get("input"))
  given_list = _text(arguments.get("input_list"))
  if no_images:
    roots = []
  elif images_roots:
    roots = list(images_roots)
  else:
    roots = [_fixed_folder(given_list or given_input or "")]
  roots = tuple(sorted({os.path.realpath(root) for root in roots
                        if root and os.path.isdir(root)}))
  input_format = _text(arguments.get("input_format")) or "auto"
  if given_list:
    input_format = "list"
  elif input_format == "auto":
    input_format = ("parquet" if (given_input or "").endswith(".parquet")
                    else "images")
  max_pixels = arguments.get("max_image_pixels")
  if not (isinstance(max_pixels, int) and not isinstance(max_pixels, bool)
          and 1 <= max_pixels <= image_limits.DEFAULT_MAX_IMAGE_PIXELS):
    max_pixels = image_limits.DEFAULT_MAX_IMAGE_PIXELS
  id_column = arguments.get("id_column", "id")
  return ImagePolicy(
      roots=roots, input_format=input_format,
      id_column=id_column if isinstance(id_column, str) and id_column else
      None,
      image_column=_text(arguments.get("image_column")) or "image",
      input_shape=_shape(manifest.get("model")), max_pixels=max_pixels)


def _allowed_path(source, policy: ImagePolicy) -> str:
  """The real local path of `source`, if the policy allows it."""
  if not isinstance(source, str) or not source:
    raise NotDrawn("no source")
  if paths.is_remote(source):
    raise NotDrawn("remote: not fetched")
  if not policy.roots:
    raise NotDrawn("images not read (no input folder)")
  real = os.path.realpath(source)
  if not any(real == root or real.startswith(root.rstrip(os.sep) + os.sep)
             for root in policy.roots):
    raise NotDrawn("outside the input folder")
  return real


def _open_regular(path: str) -> int:
  """A descriptor of a regular file, opened without blocking or following a
  last link; NotDrawn for anything else. A FIFO or device is refused from
  its stat, before any open, and checked again once open."""
  try:
    if not stat.S_ISREG(os.lstat(path).st_mode):
      raise NotDrawn("not a regular file")
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW |
                         getattr(os, "O_CLOEXEC", 0) |
                         getattr(os, "O_NOCTTY", 0))
  except OSError as error:
    raise NotDrawn(error.strerror or "cannot be opened") from None
  if not stat.S_ISREG(os.fstat(descriptor).st_mode):
    os.close(descriptor)
    raise NotDrawn("not a regular file")
  return descriptor


def _read_file(path: str) -> bytes:
  descriptor = _open_regular(path)
  try:
    if os.fstat(descriptor).st_size > MAX_IMAGE_BYTES:
      raise NotDrawn(f"larger than {MAX_IMAGE_BYTES // 1024**2} MiB")
    chunks, size = [], 0
    while size <= MAX_IMAGE_BYTES:
      chunk = os.read(descriptor, 1 << 20)
      if not chunk:
        break
      chunks.append(chunk)
      size += len(chunk)
    if size > MAX_IMAGE_BYTES:
      raise NotDrawn(f"larger than {MAX_IMAGE_BYTES // 1024**2} MiB")
    return b"".join(chunks)
  finally:
    os.close(descriptor)


def _parquet_cell(path: str, row: dict, policy: ImagePolicy):
  """The image cell of `row` in its shard, read one row group at a time."""
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  descriptor = _open_regular(path)
  with os.fdopen(descriptor, "rb") as handle:
    shard = pq.ParquetFile(handle)
    metadata = shard.metadata
    position = None
    if not policy.id_column:
      try:
        position = int(str(row["id"]).rsplit("#", 1)[1])
      except (IndexError, ValueError):
        raise NotDrawn("no row number in the id") from None
    start = 0
    for group in range(metadata.num_row_groups):
      rows = metadata.row_group(group).num_rows
      if metadata.row_group(group).total_byte_size > MAX_ROW_GROUP_BYTES:
        raise NotDrawn("row group too large")
      if position is None:
        ids = shard.read_row_group(group, columns=[policy.id_column]).column(
            0).to_pylist()
        if row["id"] in ids:
          index = ids.index(row["id"])
          return shard.read_row_group(
              group, columns=[policy.image_column]).column(0)[index].as_py()
      elif start <= position < start + rows:
        return shard.read_row_group(
            group, columns=[policy.image_column]).column(0)[
                position - start].as_py()
      start += rows
  raise NotDrawn("row not in its shard")


def _pixels(cell, policy: ImagePolicy) -> np.ndarray:
  """A Parquet cell (bytes, raw pixels, or a {bytes, path} struct) as a
  tile."""
  if isinstance(cell, dict):
    cell = cell.get("bytes")
  if isinstance(cell, (bytes, bytearray)):
    return _decode(bytes(cell), policy)
  if isinstance(cell, list):
    expected = int(np.prod(policy.input_shape))
    if len(cell) != expected or any(
        not isinstance(value, int) or not 0 <= value <= 255
        for value in cell):
      raise NotDrawn("raw pixels not of the model's shape")
    return np.asarray(cell, dtype=np.uint8).reshape(policy.input_shape)
  raise NotDrawn("no image in the cell")


def _decode(data: bytes, policy: ImagePolicy) -> np.ndarray:
  height, width, channels = policy.tile_shape
  try:
    return preprocessing.decode_image(
        data, height, width, "grayscale" if channels == 1 else "rgb",
        policy.max_pixels)
  except Exception as error:  # pylint: disable=broad-except
    # Pillow's errors are many (truncated, unknown, too large); each is one
    # placeholder.
    raise NotDrawn(f"cannot decode ({type(error).__name__})") from None


def read_tile(row: dict, policy: ImagePolicy) -> np.ndarray:
  """The image of a prediction row as uint8 (H, W, C), or NotDrawn."""
  path = _allowed_path(row.get("source"), policy)
  if policy.input_format == "parquet":
    try:
      cell = _parquet_cell(path, row, policy)
    except NotDrawn:
      raise
    except Exception as error:  # pylint: disable=broad-except
      raise NotDrawn(f"shard unreadable ({type(error).__name__})") from None
    return _pixels(cell, policy)
  return _decode(_read_file(path), policy)
