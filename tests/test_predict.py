"""The predict command's exit: the error budget (--max_error_rate)."""

import os

import pytest

from beam_jobs import predict


def _folder(root, good: int, bad: int) -> str:
  """A class folder with `good` real PNGs and `bad` files that are not
  images."""
  from model import preprocessing  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  folder = root / "images" / "Coat"
  folder.mkdir(parents=True)
  for i in range(good):
    (folder / f"good{i}.png").write_bytes(preprocessing.encode_png(
        np.full((28, 28, 1), 10 * i, np.uint8)))
  for i in range(bad):
    (folder / f"bad{i}.png").write_bytes(b"not an image")
  return str(root / "images")


def _predict(images, model, output, *flags):
  return predict.main(["--input", images, "--model", model, "--output",
                       output, "--runner", "DirectRunner",
                       "--progress_seconds", "0", *flags])


@pytest.mark.slow
def test_a_run_where_every_input_failed_exits_1(tmp_path, tiny_model,
                                                capsys):
  """Fails on the code before the fix: such a run exited 0."""
  images = _folder(tmp_path, good=0, bad=3)
  output = str(tmp_path / "out")
  assert _predict(images, tiny_model, output) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith("beam_jobs.predict: error: every input failed "
                            "(3 of 3); commonest: decode: ")
  # The results are committed all the same.
  assert os.path.exists(os.path.join(output, "_run.json"))


@pytest.mark.slow
def test_max_error_rate_sets_the_budget(tmp_path, tiny_model, capsys):
  images = _folder(tmp_path, good=3, bad=1)
  assert _predict(images, tiny_model, str(tmp_path / "a")) == 0
  assert _predict(images, tiny_model, str(tmp_path / "b"),
                  "--max_error_rate", "0.25") == 0
  assert _predict(images, tiny_model, str(tmp_path / "c"),
                  "--max_error_rate", "0.2") == 1
  assert "25.00% of inputs failed, above --max_error_rate 0.2 (1 of 4)" in (
      capsys.readouterr().err)
  assert _predict(images, tiny_model, str(tmp_path / "d"),
                  "--max_error_rate", "1.5") == 2
