"""Converts an image directory into Parquet shards.

Usage:
  python -m tools.make_shards IMAGE_DIR_OR_GLOB OUTPUT_DIR [--rows_per_shard N]
      [--model MODEL_DIR]

Each row holds `id` (the file path), `image` and `label` (the class folder
name, null for files outside class folders). By default `image` holds the
file's encoded bytes; with --model it holds raw uint8 pixels of that model's
input size, decoded exactly as the pipeline decodes them. Shards are written
under a temporary name and renamed when complete; memory holds one shard.
"""

import io
import sys
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from model import card as card_lib
from imagebatch import cli
from imagebatch import paths
from model import preprocessing

DEFAULT_ROWS_PER_SHARD = 10_000
SHARD_PREFIX = "images"


def shard_schema(raw_pixels: bool) -> pa.Schema:
  image_type = pa.list_(pa.uint8()) if raw_pixels else pa.binary()
  return pa.schema([("id", pa.string()), ("image", image_type),
                    ("label", pa.string())])


def _write_shard(rows: dict, schema: pa.Schema, path: str) -> None:
  table = pa.Table.from_pydict(rows, schema=schema)
  buffer = io.BytesIO()
  pq.write_table(table, buffer)
  temporary = path + ".tmp"
  with FileSystems.create(temporary) as handle:
    handle.write(buffer.getvalue())
  FileSystems.rename([temporary], [path])


def make_shards(input_pattern: str, output_dir: str,
                rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
                card: Optional[card_lib.ModelCard] = None) -> list:
  """Writes the shards; returns their paths. Unreadable files are skipped
  with a message when decoding for raw pixels, and kept as bytes otherwise
  (the pipeline reports them)."""
  if rows_per_shard < 1:
    raise ValueError("rows_per_shard must be at least 1")
  if card is not None and card.decoder == "tensorflow":
    raise ValueError(
        f"the model decodes with {card.decoder} into unrounded float pixels, "
        "which raw uint8 shards cannot hold; write encoded shards (no "
        "--model) and the pipeline decodes them as the model needs")
  decoder = preprocessing.card_decoder(card) if card is not None else None
  pattern = paths.expand_pattern(paths.absolute(input_pattern))
  files = paths.match_paths(pattern)
  if not files:
    raise FileNotFoundError(f"{input_pattern} matches no files")
  base = paths.pattern_base(pattern)
  schema = shard_schema(raw_pixels=card is not None)
  if not FileSystems.exists(output_dir):
    FileSystems.mkdirs(output_dir)
  count = -(-len(files) // rows_per_shard)
  written = []
  for number, start in enumerate(range(0, len(files), rows_per_shard)):
    rows = {"id": [], "image": [], "label": []}
    for path in files[start:start + rows_per_shard]:
      try:
        if not paths.is_printable(path):
          raise ValueError("the file name is not valid UTF-8")
        data = paths.read_bytes(path)
      except (OSError, ValueError) as error:
        # A FIFO, a dangling link or an undecodable name: it is no image.
        print(f"skipped {paths.printable(path)}: {type(error).__name__}: "
              f"{error}", file=sys.stderr)
        continue
      if decoder is not None:
        pixels, _, errors = decoder.decode([data])
        if errors:
          error = errors[0][1]
          print(f"skipped {path}: {type(error).__name__}: {error}",
                file=sys.stderr)
          continue
        data = pixels[0].ravel()
      rows["id"].append(path)
      rows["image"].append(data)
      rows["label"].append(paths.folder_label(path, base))
    shard = paths.join(
        output_dir, f"{SHARD_PREFIX}-{number:05d}-of-{count:05d}.parquet")
    _write_shard(rows, schema, shard)
    written.append(shard)
  return written


def build_parser() -> cli.ArgumentParser:
  parser = cli.ArgumentParser(prog="python -m tools.make_shards",
                              description=__doc__.split("\n\n")[0])
  parser.add_argument("input", help="image directory or glob")
  parser.add_argument("output", help="folder for the shards")
  parser.add_argument("--rows_per_shard", type=int,
                      default=DEFAULT_ROWS_PER_SHARD,
                      help="rows per Parquet file; each shard is one work "
                      "item for predict")
  parser.add_argument("--model", default=None,
                      help="write raw pixels of this model's input size "
                      "(default: none, the files' encoded bytes)")
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    card = card_lib.load_card(args.model) if args.model else None
    written = make_shards(args.input, args.output, args.rows_per_shard, card)
  except (FileNotFoundError, ValueError) as error:
    print(f"tools.make_shards: error: {error}", file=sys.stderr)
    return 2
  print(f"wrote {len(written)} shard(s) to {args.output}")
  cli.print_next(
      f"{args.output} ({SHARD_PREFIX}-*.parquet: id, image, label)",
      [cli.predict_command(
          paths.join(args.output, f"{SHARD_PREFIX}-*.parquet"),
          args.model or "MODEL_DIR", "--label_column", "label")])
  return 0


if __name__ == "__main__":
  sys.exit(main())
