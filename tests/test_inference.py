"""The model handler: failures and non-finite outputs are error rows of the
rows they belong to, and the other rows of the batch go on."""

import numpy as np

from beam_jobs import inference
from beam_jobs.contracts import ImageBatch
from model import card as card_lib
from model import engines


def _batch(count: int) -> ImageBatch:
  return ImageBatch(ids=[chr(ord("a") + i) for i in range(count)],
                    sources=["s"] * count, true_labels=[None] * count,
                    pixels=np.zeros((count, 28, 28, 1), dtype=np.float32))


def test_non_finite_outputs_are_inference_errors(tiny_model):
  """Fails on the code before the fix: NaN rows became predictions with a
  NaN confidence, and accuracy counted them."""

  class NanOnSomeRows(engines.Engine):
    def _raw_outputs(self, images):
      outputs = np.full((len(images), 10), 0.1, dtype=np.float32)
      outputs[1] = np.nan
      outputs[3, 2] = np.inf
      return outputs

  card = card_lib.load_card(tiny_model)
  handler = inference.ImageClassifierHandler(tiny_model)
  [result] = handler.run_inference(_batch(5), NanOnSomeRows(card))
  assert sorted(e["id"] for e in result.errors) == ["b", "d"]
  assert {e["stage"] for e in result.errors} == {"inference"}
  assert all("not finite" in e["error"] for e in result.errors)
  assert result.batch.ids == ["a", "c", "e"]
  assert np.isfinite(result.probabilities).all()
  assert result.batch.pixels is None  # no pixels past inference


def test_inference_failure_is_isolated_to_the_bad_row(tiny_model):

  class FailsOnNegative(engines.Engine):
    def _raw_outputs(self, images):
      if (images < 0).any():
        raise ValueError("negative pixel")
      return np.zeros((len(images), 10), dtype=np.float32)

  pixels = np.zeros((5, 28, 28, 1), dtype=np.float32)
  pixels[3] = -1
  batch = ImageBatch(ids=list("abcde"), sources=["s"] * 5,
                     true_labels=[None] * 5, pixels=pixels)
  card = card_lib.load_card(tiny_model)
  handler = inference.ImageClassifierHandler(tiny_model)
  [result] = handler.run_inference(batch, FailsOnNegative(card))
  assert [e["id"] for e in result.errors] == ["d"]
  assert result.errors[0]["stage"] == "inference"
  # The rows that ran, and only they, come back with their probabilities.
  assert result.batch.ids == ["a", "b", "c", "e"]
  assert result.probabilities.shape == (4, 10)
  assert not np.isnan(result.probabilities).any()
