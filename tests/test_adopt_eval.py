"""The --eval_data check's parts (model/adopt_eval.py): the one-to-one
class assignment and the margin that makes one choice clearly better. The
check itself, through the CLI on the tutorial's model, is in
tests/test_adopt.py."""

import itertools
import time

import numpy as np
import pytest

from model import adopt_eval


def _total(counts, order):
  return sum(counts[output, order[output]] for output in range(len(order)))


def test_the_assignment_is_the_best_of_every_permutation():
  rng = np.random.default_rng(0)
  for _ in range(300):
    size = int(rng.integers(1, 7))
    counts = rng.integers(0, 5, (size, size))
    order = adopt_eval.best_assignment(counts)
    assert sorted(order) == list(range(size))
    best = max(_total(counts, permutation) for permutation in
               itertools.permutations(range(size)))
    assert _total(counts, order) == best, counts


def test_ties_keep_the_order_given_and_a_permutation_is_found():
  assert list(adopt_eval.best_assignment(np.zeros((4, 4)))) == [0, 1, 2, 3]
  assert list(adopt_eval.best_assignment(np.ones((3, 3)))) == [0, 1, 2]
  rng = np.random.default_rng(1)
  shuffled = rng.permutation(50)
  counts = np.zeros((50, 50))
  counts[np.arange(50), shuffled] = 10
  counts += rng.integers(0, 3, (50, 50)) * (rng.random((50, 50)) < 0.05)
  np.testing.assert_array_equal(adopt_eval.best_assignment(counts), shuffled)


def test_many_classes_stay_bounded():
  """Exact up to MAX_EXACT_CLASSES in about a second at worst (dense random
  counts); greedy above, still one-to-one."""
  rng = np.random.default_rng(2)
  size = adopt_eval.MAX_EXACT_CLASSES
  started = time.monotonic()
  order = adopt_eval.best_assignment(rng.integers(0, 3, (size, size)))
  assert time.monotonic() - started < 10
  assert sorted(order) == list(range(size))
  shuffled = rng.permutation(2000)
  counts = np.zeros((2000, 2000))
  counts[np.arange(2000), shuffled] = 5
  order = adopt_eval.best_assignment(counts)
  np.testing.assert_array_equal(order, shuffled)
  order = adopt_eval.greedy_assignment(rng.integers(0, 3, (40, 40)) *
                                       (rng.random((40, 40)) < 0.1))
  assert sorted(order) == list(range(40))


def test_an_order_is_fitted_among_the_classes_that_occur():
  # Outputs 0 and 1 swapped; class 3 never occurs and keeps its place.
  labels = np.array([0, 0, 1, 1, 2, 2])
  predicted = np.array([1, 1, 0, 0, 2, 2])
  np.testing.assert_array_equal(adopt_eval.fit_order(labels, predicted, 4),
                                [1, 0, 2, 3])
  # A row that named no class (not finite) takes no part.
  np.testing.assert_array_equal(
      adopt_eval.fit_order(labels, np.array([1, 1, 0, -1, 2, 2]), 4),
      [1, 0, 2, 3])


def _scores(correct, loss):
  return adopt_eval.Scores("raw", None, np.asarray(correct, bool),
                           np.asarray(loss, np.float32))


@pytest.mark.parametrize("better, worse, expected", [
    # Accuracy 0.75 against 0.25 on 40 images: clearly.
    (([1, 1, 1, 0] * 10, [0.5] * 40), ([1, 0, 0, 0] * 10, [0.5] * 40), True),
    # Accuracy 0.05 higher: not by accuracy, and log loss is the same.
    (([1] * 21 + [0] * 19, [0.5] * 40), ([1] * 19 + [0] * 21, [0.5] * 40),
     False),
    # The same accuracy, log loss 0.7 against 5.9: clearly.
    (([1, 0] * 20, [0.7] * 40), ([1, 0] * 20, [5.9] * 40), True),
    # Log loss halved but accuracy 0.10 lower: not (a flatter model).
    (([1, 0, 0, 0] * 10, [1.0] * 40), ([1, 1, 0, 0] * 10, [3.0] * 40),
     False),
    # Fewer than MIN_IMAGES tell nothing, however far apart.
    (([1] * 19, [0.5] * 19), ([0] * 19, [0.5] * 19), False),
    (([1] * 20, [0.5] * 20), ([0] * 20, [0.5] * 20), True),
])
def test_clearly_better_needs_the_margin_and_the_standard_error(
    better, worse, expected):
  assert adopt_eval.clearly_better(_scores(*better), _scores(*worse)) is (
      expected)
