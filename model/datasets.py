"""Training data: Fashion-MNIST and folders of class sub-folders.

Fashion-MNIST comes through Keras' own loader, or from any folder holding its
four `*-idx?-ubyte.gz` files (the layout Keras caches, which is also how the
repo's embedded sample is stored). Image folders are split by
`keras.utils.image_dataset_from_directory` and decoded by the same function the
pipeline serves with.
"""

import dataclasses
import gzip
import os
import struct
from typing import Optional

import numpy as np

from model import preprocessing

# Keras' tutorial names, with "T-shirt/top" made safe as a folder name.
FASHION_MNIST_CLASSES = [
    "T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
    "Sneaker", "Bag", "Ankle boot"
]
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif",
                    ".tiff")
_IDX_DTYPE = 0x08  # unsigned byte


@dataclasses.dataclass
class Split:
  """Images as uint8 (N, H, W, C) and integer labels."""
  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)


@dataclasses.dataclass
class Dataset:
  name: str
  class_names: list
  color_mode: str
  train: Split
  test: Split
  test_name: str  # "test" or "validation"
  source: str
  split_seed: Optional[int] = None  # the validation split's seed, if made here


def read_idx(path: str) -> np.ndarray:
  """Reads a gzipped IDX file (the Fashion-MNIST format) into a uint8 array."""
  with gzip.open(path, "rb") as handle:
    data = handle.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != _IDX_DTYPE:
    raise ValueError(f"{path} is not an unsigned-byte IDX file")
  ndim = data[3]
  shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
  body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
  if body.size != int(np.prod(shape)):
    raise ValueError(f"{path} is truncated: header says {shape}, "
                     f"found {body.size} values")
  return body.reshape(shape)


def write_idx(path: str, array: np.ndarray) -> None:
  """Writes a uint8 array as a gzipped IDX file."""
  array = np.ascontiguousarray(array, dtype=np.uint8)
  header = bytes([0, 0, _IDX_DTYPE, array.ndim]) + struct.pack(
      f">{array.ndim}I", *array.shape)
  # mtime=0 keeps the file byte-identical across runs.
  with open(path, "wb") as raw, gzip.GzipFile(
      fileobj=raw, mode="wb", mtime=0) as handle:
    handle.write(header + array.tobytes())


def load_fashion_mnist(data_dir: Optional[str] = None) -> Dataset:
  """Loads Fashion-MNIST, from `data_dir` or through Keras' loader.

  Keras' loader downloads the files on first use, or reads them offline from
  `$KERAS_HOME/datasets/fashion-mnist/` when they are already there.
  """
  if data_dir is None:
    import keras  # pylint: disable=import-outside-toplevel
    (x_train, y_train), (x_test, y_test) = (
        keras.datasets.fashion_mnist.load_data())
    source = "keras.datasets.fashion_mnist"
  else:
    arrays = {}
    for split, names in FASHION_MNIST_FILES.items():
      paths = [os.path.join(data_dir, name) for name in names]
      missing = [p for p in paths if not os.path.isfile(p)]
      if missing:
        raise FileNotFoundError(
            f"{data_dir} has no Fashion-MNIST {split} files: expected "
            f"{', '.join(names)}")
      arrays[split] = [read_idx(p) for p in paths]
    (x_train, y_train), (x_test, y_test) = arrays["train"], arrays["test"]
    source = os.path.abspath(data_dir)
  for images, labels in ((x_train, y_train), (x_test, y_test)):
    if len(images) != len(labels):
      raise ValueError(f"Fashion-MNIST in {source}: {len(images)} images but "
                       f"{len(labels)} labels")
  return Dataset(
      name="fashion_mnist",
      class_names=list(FASHION_MNIST_CLASSES),
      color_mode="grayscale",
      train=Split(x_train[..., np.newaxis], y_train.astype(np.int32)),
      test=Split(x_test[..., np.newaxis], y_test.astype(np.int32)),
      test_name="test",
      source=source)


def is_fashion_mnist_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, FASHION_MNIST_FILES["train"][0]))


def load_image_folder(directory: str,
                      image_size: tuple,
                      color_mode: str,
                      validation_split: float,
                      seed: int) -> Dataset:
  """Loads a folder of class sub-folders with a seeded validation split.

  `image_dataset_from_directory` lists the files, infers class names from
  folder names and makes the split; the images are then decoded with
  `preprocessing.decode_image`, exactly as the pipeline will decode them.
  """
  class_names, subsets = split_image_folder(directory, validation_split,
                                            seed)
  splits = []
  for paths, labels in subsets:
    images = np.stack([
        _decode_file(path, image_size, color_mode) for path in paths
    ])
    splits.append(Split(images, labels))
  return Dataset(
      name=os.path.basename(os.path.normpath(directory)),
      class_names=class_names,
      color_mode=color_mode,
      train=splits[0],
      test=splits[1],
      test_name="validation",
      source=os.path.abspath(directory),
      split_seed=seed)


def split_image_folder(directory: str, validation_split: float,
                       seed: int) -> tuple:
  """(class names, [(train paths, labels), (validation paths, labels)]):
  `image_dataset_from_directory`'s listing and seeded split, without
  decoding anything, so every trainer splits a folder the same way."""
  import keras  # pylint: disable=import-outside-toplevel
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no image folder at {directory}: expected a "
                            "folder with one sub-folder of images per class")
  if not 0.0 < validation_split < 1.0:
    raise ValueError(
        f"validation_split must be between 0 and 1, got {validation_split}")
  try:
    # The size is the dataset's, never used: nothing here is decoded.
    train, validation = keras.utils.image_dataset_from_directory(
        directory,
        validation_split=validation_split,
        subset="both",
        seed=seed,
        image_size=(8, 8),
        verbose=False)
  except ValueError as error:
    raise ValueError(f"cannot read image folder {directory}: {error}") from None
  class_names = list(train.class_names)
  if len(class_names) < 2:
    raise ValueError(f"{directory} has {len(class_names)} class folder(s); "
                     "a classifier needs at least two")
  name_to_index = {name: i for i, name in enumerate(class_names)}
  subsets = []
  for subset in (train, validation):
    paths = list(subset.file_paths)
    if not paths:
      raise ValueError(f"{directory} has too few images for a "
                       f"{validation_split:.0%} validation split")
    labels = np.array(
        [name_to_index[os.path.basename(os.path.dirname(p))] for p in paths],
        dtype=np.int32)
    subsets.append((paths, labels))
  return class_names, subsets


def _decode_file(path: str, image_size: tuple, color_mode: str) -> np.ndarray:
  with open(path, "rb") as handle:
    data = handle.read()
  try:
    return preprocessing.decode_image(data, image_size[0], image_size[1],
                                      color_mode)
  except Exception as error:  # pylint: disable=broad-except
    raise ValueError(f"cannot decode training image {path}: {error}") from None


def write_png_folder(split: Split, class_names: list, out_dir: str) -> int:
  """Writes a split as PNG files in one sub-folder per class."""
  for name in class_names:
    os.makedirs(os.path.join(out_dir, name), exist_ok=True)
  for index, (pixels, label) in enumerate(zip(split.images, split.labels)):
    path = os.path.join(out_dir, class_names[label], f"{index:06d}.png")
    with open(path, "wb") as handle:
      handle.write(preprocessing.encode_png(pixels))
  return len(split)


def build_parser():
  from imagebatch import cli  # pylint: disable=import-outside-toplevel
  parser = cli.ArgumentParser(
      prog="python -m model.datasets",
      description="Write a Fashion-MNIST split as PNG files in class folders.")
  parser.add_argument("--data", default=None,
                      help="folder of the four IDX files (default: none, "
                      "Keras' loader, which downloads)")
  parser.add_argument("--split", default="test", choices=["train", "test"],
                      help="which split to write")
  parser.add_argument("--limit", type=int, default=None,
                      help="write only the first N images (default: all)")
  parser.add_argument("--to_png", required=True, help="output folder")
  return parser


def main(argv=None) -> int:
  """Writes a Fashion-MNIST split as a PNG folder, for the pipeline to read."""
  import sys  # pylint: disable=import-outside-toplevel
  from imagebatch import cli  # pylint: disable=import-outside-toplevel
  args = build_parser().parse_args(argv)
  try:
    dataset = load_fashion_mnist(args.data)
  except (FileNotFoundError, ValueError) as error:
    print(f"model.datasets: error: {error}", file=sys.stderr)
    return 2
  split = getattr(dataset, args.split)
  if args.limit:
    split = Split(split.images[:args.limit], split.labels[:args.limit])
  count = write_png_folder(split, dataset.class_names, args.to_png)
  print(f"wrote {count} PNG images to {args.to_png}")
  cli.print_next(
      f"{args.to_png} (one folder per class)",
      [cli.predict_command(args.to_png),
       cli.program("make_shards", args.to_png,
                   "SHARDS_DIR")])
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
