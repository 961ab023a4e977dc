"""The HTML/PNG report over a real run's outputs."""

import html
import io
import os
import shutil

import numpy as np
import pytest
from PIL import Image

# Without the tools extra these tests skip.
pytest.importorskip("duckdb")
pytest.importorskip("matplotlib")
# pylint: disable=wrong-import-position

from beam_jobs import outputs
from tools import make_shards
from tools import report
from tools import report_folder
from tools import report_images
from tools import report_page
from model import card as card_lib
from model import datasets
from tests.helpers import run_predict


@pytest.fixture(scope="module")
def run(tmp_path_factory, sample, tiny_model):
  """A prediction run over 30 PNGs, one of which is removed afterwards."""
  root = tmp_path_factory.mktemp("report")
  images = root / "images"
  split = datasets.Split(sample.test.images[:30], sample.test.labels[:30])
  datasets.write_png_folder(split, sample.class_names, str(images))
  run = run_predict(root / "out", input=str(images), model=tiny_model,
                    write_probabilities=True)
  return root, run


@pytest.mark.slow
def test_report_renders_every_plot(run):
  root, labelled = run
  written = report.write_report(labelled.output, str(root / "report"), samples=6)
  assert set(written) == {"samples", "mistakes", "confusion", "confidence",
                          "reliability", "index"}
  expected_sizes = {"samples": (1200, 540), "confusion": (620, 620),
                    "confidence": (700, 400), "reliability": (500, 500)}
  for name, size in expected_sizes.items():
    with Image.open(written[name]) as image:
      assert image.size == size, name
      pixels = np.asarray(image.convert("L"))
      assert pixels.std() > 10, f"{name} looks blank"
  page = open(written["index"]).read()
  for name in ("samples", "confusion", "confidence", "reliability"):
    assert os.path.basename(written[name]) in page
  assert "accuracy" in page and "predictions per class" in page


def test_images_are_read_back_from_their_source(run, tiny_model, tmp_path):
  manifest = run[1].manifest
  policy = report_images.policy_for(manifest)
  row = run[1].predictions[0]
  pixels = report_images.read_tile(row, policy)
  original = np.asarray(Image.open(row["source"]))
  np.testing.assert_array_equal(pixels[..., 0], original)

  # Raw-pixel Parquet inputs are read back from their shard.
  shards = tmp_path / "shards"
  card = card_lib.load_card(tiny_model)
  make_shards.make_shards(os.path.dirname(os.path.dirname(row["source"])),
                          str(shards), rows_per_shard=100, card=card)
  shard = sorted(shards.iterdir())[0]
  parquet_policy = report_images.policy_for({
      "arguments": {"input": str(shards / "*.parquet"),
                    "id_column": "id", "image_column": "image"},
      "model": {"input_shape": list(card.input_shape)}})
  back = report_images.read_tile({"id": row["source"], "source": str(shard)},
                                 parquet_policy)
  np.testing.assert_array_equal(back[..., 0], original)


@pytest.mark.slow
def test_missing_source_leaves_a_blank_tile(run, tmp_path):
  root, labelled = run
  rows = labelled.predictions
  moved = tmp_path / "moved.png"
  shutil.move(rows[0]["source"], moved)
  try:
    with pytest.raises(report_images.NotDrawn):
      report_images.read_tile(rows[0],
                              report_images.policy_for(labelled.manifest))
    written = report.write_report(labelled.output, str(root / "report2"),
                                  samples=30)
    assert os.path.getsize(written["samples"]) > 0
  finally:
    shutil.move(moved, rows[0]["source"])


@pytest.fixture(scope="module")
def unlabelled_run(tmp_path_factory, sample, tiny_model):
  """A run over 12 PNGs in one flat folder: no true labels."""
  from model import preprocessing  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("unlabelled")
  images = root / "images"
  images.mkdir()
  for i in range(12):
    (images / f"{i:03d}.png").write_bytes(
        preprocessing.encode_png(sample.test.images[i]))
  return root, run_predict(root / "out", input=str(images), model=tiny_model)


def _red_pixels(path) -> int:
  with Image.open(path) as image:
    pixels = np.asarray(image.convert("RGB")).astype(int)
  return int(((pixels[..., 0] > 180) & (pixels[..., 1] < 80) &
              (pixels[..., 2] < 80)).sum())


@pytest.mark.slow
def test_unlabelled_report_is_honest(unlabelled_run):
  root, unlabelled = unlabelled_run
  written = report.write_report(unlabelled.output, str(root / "report"),
                                samples=6)
  assert set(written) == {"samples", "confidence", "index"}
  assert set(written.skipped) == {"mistakes", "confusion", "reliability",
                                  "embedding_map"}
  page = open(written["index"]).read()
  assert "not drawn" in page
  for title in ("most confident mistakes", "confusion matrix",
                "reliability diagram"):
    assert title in page
  assert "no prediction has a true_label" in page
  # Nothing is known to be wrong: no red bar, no red caption.
  assert _red_pixels(written["samples"]) == 0


def test_grid_title_says_what_the_colours_mean():
  labelled = {"label": "a", "true_label": "a"}
  unlabelled = {"label": "a", "true_label": None}
  assert "red: wrong" in report.grid_title([labelled, labelled])
  assert "red:" not in report.grid_title([unlabelled])
  assert "no true label" in report.grid_title([labelled, unlabelled])




# Reports of crafted runs: shards and a manifest as a run leaves them.
RUN_ID = "20240101T000000-0a0b0c"
NAMES = ["t-shirt", "trouser", "a class name far too long to fit on an axis"]


def _committed(folder, predictions, errors=(), **manifest) -> str:
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  folder.mkdir(parents=True)
  files = {"predictions": [], "errors": []}
  errors = pa.Table.from_pylist(list(errors), schema=outputs.ERRORS_SCHEMA)
  for kind, table in (("predictions", predictions), ("errors", errors)):
    name = f"{kind}-{RUN_ID}-00000-of-00001.parquet"
    pq.write_table(table, folder / name)
    files[kind].append({"name": name, "rows": table.num_rows})
  outputs.write_manifest(str(folder), dict(
      {"run_id": RUN_ID, "model_id": "m", "files": files}, **manifest))
  return str(folder)


def _predictions(ids, sources, classes=NAMES, labelled=True,
                 probabilities=True):
  rows = len(ids)
  predicted = np.arange(rows) % len(classes)
  values = np.full((rows, len(classes)), 0.2 / max(1, len(classes) - 1),
                   dtype=np.float32)
  values[np.arange(rows), predicted] = 0.8
  truth = [classes[(i // 2) % len(classes)] if labelled else None
           for i in range(rows)]
  return outputs.predictions_table(ids, sources, truth, values, classes, 2,
                                   "m", "tflite", probabilities)


def _png_declaring(width: int, height: int) -> bytes:
  """A small PNG whose header says width x height (its CRC fixed)."""
  import struct  # pylint: disable=import-outside-toplevel
  import zlib  # pylint: disable=import-outside-toplevel
  buffer = io.BytesIO()
  Image.new("L", (2, 2)).save(buffer, format="PNG")
  data = bytearray(buffer.getvalue())
  data[16:24] = struct.pack(">II", width, height)
  data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
  return bytes(data)


def _odd_images(folder) -> dict:
  """{name: path} of images scraped sets hold: 1x1 in three modes, palette,
  16-bit, CMYK, grey with alpha, 1-bit, 1000x2, 20 megapixels; and three
  that cannot be drawn: truncated, a header of 900 megapixels, not an
  image."""
  folder.mkdir()
  images = {}

  def save(name, image, **options):
    image.save(folder / name, **options)
    images[name] = str(folder / name)

  save("one_pixel_rgb.png", Image.new("RGB", (1, 1), (200, 10, 10)))
  save("one_pixel_grey.png", Image.new("L", (1, 1), 128))
  save("one_pixel_rgba.png", Image.new("RGBA", (1, 1), (0, 0, 255, 128)))
  save("palette.png", Image.new("RGB", (40, 30), (0, 200, 0)).convert("P"))
  save("sixteen_bit.png", Image.fromarray(
      (np.arange(64 * 64, dtype=np.uint16) * 16).reshape(64, 64)))
  save("cmyk.jpg", Image.new("CMYK", (32, 32), (0, 255, 255, 0)))
  save("grey_alpha.png", Image.new("LA", (20, 20), (100, 50)))
  save("one_bit.png", Image.new("1", (20, 20), 1))
  save("thin.png", Image.new("RGB", (1000, 2), (30, 60, 90)))
  save("huge.png", Image.new("L", (5000, 4000), 90), compress_level=1)
  whole = io.BytesIO()
  Image.new("RGB", (64, 64), (1, 2, 3)).save(whole, format="PNG")
  for name, data in (("truncated.png", whole.getvalue()[:60]),
                     ("bomb.png", _png_declaring(30000, 30000)),
                     ("not_an_image.png", b"hello")):
    (folder / name).write_bytes(data)
    images[name] = str(folder / name)
  return images


UNDRAWABLE = {"truncated.png", "bomb.png", "not_an_image.png"}


@pytest.mark.parametrize("shape", [
    [28, 28, 1], pytest.param([32, 32, 3], marks=pytest.mark.slow)])
def test_a_run_of_odd_images_is_drawn_never_a_crash(tmp_path, shape):
  """Fails on the code before the fix: a 1x1 image raised TypeError:
  Invalid shape (3,) in imshow and no report was written."""
  images = _odd_images(tmp_path / "images")
  paths = list(images.values())
  output = _committed(tmp_path / "out", _predictions(paths, paths),
                      arguments={"input": str(tmp_path / "images")},
                      model={"input_shape": shape}, class_names=NAMES)
  written = report.write_report(output, str(tmp_path / "report"),
                                samples=len(paths))
  assert {"samples", "mistakes", "confusion", "confidence",
          "reliability"} <= set(written)
  policy = report_images.policy_for(outputs.read_manifest(output))
  for name, path in images.items():
    row = {"id": path, "source": path}
    if name in UNDRAWABLE:
      with pytest.raises(report_images.NotDrawn):
        report_images.read_tile(row, policy)
    else:
      tile = report_images.read_tile(row, policy)
      assert tile.shape == tuple(shape) and tile.dtype == np.uint8, name


def test_ids_are_never_opened_and_sources_only_under_the_input(
    tmp_path, monkeypatch):
  """A row's id is never opened, and a source only when it is a regular
  file under the run's input folder. Fails on the code before the fix,
  which opened the private image a row's id named."""
  private = tmp_path / "private.png"
  Image.new("L", (8, 8), 7).save(private)
  images = tmp_path / "images"
  images.mkdir()
  Image.new("L", (8, 8), 200).save(images / "mine.png")
  os.mkfifo(images / "fifo.png")
  os.symlink(private, images / "link.png")
  rows = [  # (id, source)
      (str(private), str(images / "gone.png")),
      ("plain id", str(private)),
      ("through a link", str(images / "link.png")),
      ("a fifo", str(images / "fifo.png")),
      ("up and out", str(images / ".." / "private.png")),
      ("remote", "gs://bucket/private.png"),
      ("mine", str(images / "mine.png")),
  ]
  output = _committed(tmp_path / "out", _predictions(
      [i for i, _ in rows], [s for _, s in rows]),
                      arguments={"input": str(images) + "/*.png"},
                      model={"input_shape": [8, 8, 1]}, class_names=NAMES)
  opened = []
  real_open = os.open

  def spy(path, *args, **kwargs):
    opened.append(os.path.realpath(os.fsdecode(path)))
    return real_open(path, *args, **kwargs)

  monkeypatch.setattr(os, "open", spy)
  report.write_report(output, str(tmp_path / "report"), samples=len(rows))
  monkeypatch.undo()
  assert str(private) not in opened
  assert str(images / "fifo.png") not in opened
  assert str(images / "mine.png") in opened
  policy = report_images.policy_for(outputs.read_manifest(output))
  reasons = {}
  for id_, source in rows:
    try:
      report_images.read_tile({"id": id_, "source": source}, policy)
      reasons[id_] = "drawn"
    except report_images.NotDrawn as error:
      reasons[id_] = str(error)
  assert reasons == {
      str(private): "No such file or directory",
      "plain id": "outside the input folder",
      "through a link": "outside the input folder",
      "a fifo": "not a regular file",
      "up and out": "outside the input folder",
      "remote": "remote: not fetched",
      "mine": "drawn",
  }
  # --no_images reads nothing; --images_root names other folders.
  assert not report_images.policy_for(outputs.read_manifest(output),
                                      no_images=True).roots
  assert report_images.policy_for(
      outputs.read_manifest(output),
      [str(tmp_path)]).roots == (os.path.realpath(tmp_path),)


def test_the_report_writes_only_into_its_own_folders(tmp_path, capsys):
  """Fails on the code before the fix, which replaced a user's own
  index.html and plots in --out."""
  paths = [f"img{i}" for i in range(6)]
  output = _committed(tmp_path / "out", _predictions(paths, paths),
                      class_names=NAMES)
  users = tmp_path / "mine"
  users.mkdir()
  for name in ("index.html", "samples.png", "notes.txt"):
    (users / name).write_text(f"the user's {name}")
  before = {name: (users / name).read_text() for name in os.listdir(users)}
  assert report.main([output, "--out", str(users)]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "did not write" in err, err
  assert {name: (users / name).read_text()
          for name in os.listdir(users)} == before

  # A new folder is marked first, and is then the report's to rewrite; a
  # file the user adds there stays, a plot the next report cannot draw goes.
  ours = tmp_path / "report"
  written = report.write_report(output, str(ours), samples=1)
  assert (ours / report_folder.MARKER).is_file()
  (ours / "notes.txt").write_text("mine")
  unlabelled = _committed(tmp_path / "unlabelled", _predictions(
      paths, paths, labelled=False), class_names=NAMES)
  again = report.write_report(unlabelled, str(ours), samples=1)
  assert "mistakes" in written and "mistakes" not in again
  assert sorted(os.listdir(ours)) == sorted(
      [report_folder.MARKER, "notes.txt", "index.html",
       report.FILES["samples"], report.FILES["confidence"]])
  assert (ours / "notes.txt").read_text() == "mine"

  # A link planted under one of the report's names is refused, never
  # followed.
  target = tmp_path / "bashrc"
  target.write_text("precious")
  os.remove(ours / "index.html")
  os.symlink(target, ours / "index.html")
  assert report.main([unlabelled, "--out", str(ours), "--samples", "1"]) == 2
  assert "not a regular file" in capsys.readouterr().err
  assert target.read_text() == "precious"
  # An empty folder is taken; a file named --out is refused.
  (tmp_path / "empty").mkdir()
  assert report.main([unlabelled, "--out", str(tmp_path / "empty"),
                      "--samples", "1"]) == 0
  assert report.main([unlabelled, "--out", str(target)]) == 2


def test_the_page_has_a_header_per_class_scores_and_failing_files(tmp_path):
  """Fails on the code before the fix: no run date, input, model source,
  engine, per-class table or failing files."""
  paths = [f"img{i}" for i in range(9)]
  errors = [{"id": f"<script>bad{i:02d}</script>", "source": "s",
             "stage": "decode", "error": "UnidentifiedImageError: " + "x" * 500}
            for i in range(25)]
  output = _committed(
      tmp_path / "out", _predictions(paths, paths), errors,
      class_names=NAMES, finished_at="2024-01-01T00:10:00Z",
      arguments={"input": "/data/photos/**", "model": "models/fashion",
                 "engine": "auto"},
      counts={"inputs": 34, "predictions": 9, "errors": 25},
      images_per_second=12.5)
  written = report.write_report(output, str(tmp_path / "report"), samples=1)
  page = open(written["index"], encoding="utf-8").read()
  for fact in ("2024-01-01T00:10:00Z", "/data/photos/**", "models/fashion",
               "tflite", ">34<", "12.5", "precision, recall and F1 per class",
               "failing files", "5 more failing files"):
    assert fact in page, fact
  assert "<script>" not in page and "&lt;script&gt;bad00" in page
  assert page.count("UnidentifiedImageError") == report_page.MAX_FAILING_FILES
  assert "x" * 400 not in page
  for name in NAMES:
    assert html.escape(name) in page


def test_a_run_where_every_input_failed_is_reported(tmp_path):
  errors = [{"id": f"bad{i}", "source": "s", "stage": "read",
             "error": "OSError: gone"} for i in range(3)]
  output = _committed(tmp_path / "out", _predictions([], []), errors,
                      class_names=NAMES)
  written = report.write_report(output, str(tmp_path / "report"))
  assert set(written) == {"index"}
  page = open(written["index"], encoding="utf-8").read()
  assert "no input was classified" in page and "bad2" in page


def test_a_write_embeddings_run_where_every_input_failed_is_reported(
    tmp_path):
  # The embedding column is there and holds no row: the map is skipped,
  # the report drawn.
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  errors = [{"id": "bad", "source": "s", "stage": "decode",
             "error": "UnidentifiedImageError: no image"}]
  output = _committed(
      tmp_path / "out",
      pa.Table.from_pylist([], schema=outputs.predictions_schema(False, 4)),
      errors, class_names=NAMES)
  written = report.write_report(output, str(tmp_path / "report"))
  assert set(written) == {"index"}
  assert "no row of the predictions has an embedding" in (
      written.skipped["embedding_map"])
  page = open(written["index"], encoding="utf-8").read()
  assert "no input was classified" in page and "bad" in page


def test_a_report_of_many_classes_draws_the_commonest(tmp_path):
  """100,000 classes, 20 labelled rows with every probability: the report
  draws the classes that occur, and at most MAX_BARS bars a sample.
  The code before the fix built a 100,000 x 100,000 matrix."""
  classes = [f"class {i:06d}" for i in range(100_000)]
  paths = [f"img{i}" for i in range(20)]
  table = _predictions(paths, paths, classes=classes)
  output = _committed(tmp_path / "out", table, class_names=classes)
  written = report.write_report(output, str(tmp_path / "report"), samples=2)
  assert {"samples", "mistakes", "confusion"} <= set(written)
  row = table.slice(0, 1).to_pylist()[0]
  names, values = report.probability_bars(row, classes)
  assert len(names) <= report.MAX_BARS + 1 and row["label"] == names[0]
  assert row["true_label"] in names
  with Image.open(written["confusion"]) as image:
    assert max(image.size) < 1500


@pytest.mark.parametrize("flags", [
    ["--samples", "0"], ["--samples", "-1"], ["--samples", "1000"],
    ["--samples", "x"], ["--timeout", "nan"], ["--timeout", "0"],
    ["--memory_limit", "0"],
])
def test_report_flags_are_checked_in_one_line(tmp_path, capsys, flags):
  with pytest.raises(SystemExit) as exit_:
    report.main([str(tmp_path), "--out", str(tmp_path / "r")] + flags)
  err = capsys.readouterr().err
  assert exit_.value.code == 2 and err.count("\n") == 1, err
  assert not os.path.exists(tmp_path / "r")


def test_a_hostile_folder_is_answered_without_a_traceback(tmp_path, capsys):
  """NaN and null confidences, and a manifest whose fields have the wrong
  types: the summary, accuracy and the report answer what they can. Fails
  on the code before the fix ("counts": "x" raised AttributeError in the
  summary and the report)."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  from tools import query  # pylint: disable=import-outside-toplevel
  paths = ["a", "b", "c"]
  table = _predictions(paths, paths)
  table = table.set_column(
      table.schema.get_field_index("confidence"), "confidence",
      pa.array([float("nan"), None, 0.5], pa.float32()))
  output = _committed(tmp_path / "out", table)
  assert query.main([output]) == 0
  assert query.main([output, "accuracy"]) == 0
  assert report.main([output, "--out", str(tmp_path / "report")]) == 0
  assert "Traceback" not in capsys.readouterr().err
  # A manifest whose fields have the wrong types is damaged: one line
  # (beam_jobs/records.py type-checks every field for every reader).
  damaged = _committed(tmp_path / "damaged", table, class_names="abc",
                       counts="x", arguments=["--input", "/"],
                       model={"input_shape": "x"}, finished_at={"a": 1},
                       images_per_second="fast")
  for command in (query.main, report.main):
    assert command([damaged, "--out", str(tmp_path / "report2")] if
                   command is report.main else [damaged]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "_run.json" in err, err
