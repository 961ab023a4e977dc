"""What `--eval_data` says about how an adopted model is fed: the input scale
and the class order that fit its labelled images best.

Each plausible input scale for the model's colour mode (raw, unit and
symmetric; for RGB also caffe and torch; and the user's own custom one) is
scored on the same images through the serving decoder: accuracy, and mean
log loss (minus the log probability given to the true class). Accuracy
alone cannot tell raw from unit for a ReLU network, since scaling its input
scales its logits and mostly keeps their order; log loss can: a model fed
pixels 255 times too large is sure of every answer, right or wrong (the
Fashion-MNIST tutorial's MLP: accuracy 0.77 either way, log loss 0.71 with
unit and 5.9 with raw, mean confidence 0.68 against 0.999).

The class order is the confusion matrix's best one-to-one assignment of the
model's outputs to the classes (`best_assignment`). An order picked on the
images it is scored on flatters itself, so each half of the images is
scored with the order found on the other half (cross-fitting), and only that
score is compared with the given order.

One configuration (a scale and an order) is clearly better than another
(`clearly_better`), on the same images, when its accuracy is higher by at
least ACCURACY_MARGIN and by SE_MULTIPLE standard errors of the per-image
difference; or when its mean log loss is at most half the other's, lower by
at least LOG_LOSS_MARGIN and by SE_MULTIPLE standard errors, and its
accuracy is no lower by more than ACCURACY_SLACK; and never on fewer than
MIN_IMAGES images.
"""

import copy
import dataclasses
import math
import shlex
from typing import Optional

import numpy as np

from model import adopt_checks
from model import card as card_lib
from model.model_formats import AdoptError

ACCURACY_MARGIN = 0.10
LOG_LOSS_MARGIN = 0.5
ACCURACY_SLACK = 0.02
SE_MULTIPLE = 2.0
# Fewer images than this tell nothing clearly (the standard error of a
# handful is itself a guess).
MIN_IMAGES = 20
# A probability is never taken below this (log loss at most 27.6), so that
# one image cannot outweigh the rest.
PROBABILITY_FLOOR = 1e-12
# The scores of every scale for every class are kept per image; the images
# scored are a sample spread over the classes, as many as fit in this.
SCORE_BYTES = 256 << 20
# The exact assignment takes up to about a second at 300 classes; above,
# a greedy one (largest counts first). Either is scored on held-out images,
# so a weaker order only makes the check less sensitive, never wrong.
MAX_EXACT_CLASSES = 300
# Classes that occur (as a label or a prediction) beyond this: the class
# order is not checked.
MAX_ORDER_CLASSES = 5000
# The scales worth trying for each colour mode (caffe and torch are RGB).
CANDIDATE_SCALES = {"grayscale": ("raw", "unit", "symmetric"),
                    "rgb": ("raw", "unit", "symmetric", "caffe", "torch")}


@dataclasses.dataclass
class Scores:
  """One configuration's per-image results on the eval sample."""
  scale: str
  order: Optional[np.ndarray]  # outputs -> classes; None: as given
  correct: np.ndarray  # bool per image
  loss: np.ndarray  # log loss per image

  @property
  def accuracy(self) -> float:
    return float(self.correct.mean())

  @property
  def log_loss(self) -> float:
    return float(self.loss.mean())


@dataclasses.dataclass
class Verdict:
  """What the check decided: the scale to serve with, the record for the
  card, and the warnings for overrides the user confirmed."""
  input_scale: str
  record: dict
  warnings: list


def best_assignment(counts: np.ndarray) -> np.ndarray:
  """For a square matrix of counts[output, class], the permutation `order`
  (order[output] = class) maximising the sum of counts[output,
  order[output]]; ties go to the diagonal (the order as given).

  The Hungarian method (shortest augmenting paths, O(n^3), each step
  vectorised over columns); greedy above MAX_EXACT_CLASSES.
  """
  counts = np.asarray(counts, np.float64)
  size = len(counts)
  if size > MAX_EXACT_CLASSES:
    return greedy_assignment(counts)
  # Minimised: minus the counts, the diagonal a little cheaper still. The
  # whole bonus is below one count, so it only breaks ties.
  cost = -(counts + np.eye(size) * (0.5 / max(1, size)))
  row_potential = np.zeros(size + 1)
  column_potential = np.zeros(size + 1)
  # match[column] is the row assigned to it (1-based; 0: none); column 0
  # holds the row being added.
  match = np.zeros(size + 1, np.int64)
  way = np.zeros(size + 1, np.int64)
  for row in range(1, size + 1):
    match[0] = row
    column = 0
    slack = np.full(size + 1, np.inf)
    used = np.zeros(size + 1, bool)
    while True:
      used[column] = True
      current = match[column]
      reduced = (cost[current - 1] - row_potential[current] -
                 column_potential[1:])
      free = ~used[1:]
      better = free & (reduced < slack[1:])
      slack[1:][better] = reduced[better]
      way[1:][better] = column
      candidates = np.where(free, slack[1:], np.inf)
      following = int(np.argmin(candidates)) + 1
      delta = candidates[following - 1]
      row_potential[match[used]] += delta
      column_potential[used] -= delta
      slack[1:][free] -= delta
      column = following
      if match[column] == 0:
        break
    while column:
      previous = way[column]
      match[column] = match[previous]
      column = previous
  order = np.empty(size, np.int64)
  order[match[1:] - 1] = np.arange(size)
  return order


def greedy_assignment(counts: np.ndarray) -> np.ndarray:
  """Largest counts first, then the diagonal where free, then what is left
  in order: a one-to-one assignment, not always the best."""
  size = len(counts)
  order = np.full(size, -1, np.int64)
  taken = np.zeros(size, bool)
  outputs, classes = np.nonzero(counts)
  values = counts[outputs, classes]
  for index in np.lexsort((outputs != classes, -values)):
    output, label = outputs[index], classes[index]
    if order[output] < 0 and not taken[label]:
      order[output], taken[label] = label, True
  for output in np.flatnonzero(order < 0):
    if not taken[output]:
      order[output], taken[output] = output, True
  order[order < 0] = np.flatnonzero(~taken)
  return order


def _full_order(assigned: np.ndarray, occurring: np.ndarray,
                num_classes: int) -> np.ndarray:
  """An assignment among the occurring classes as a permutation of all."""
  order = np.arange(num_classes)
  order[occurring] = occurring[assigned]
  return order


def fit_order(labels: np.ndarray, predicted: np.ndarray,
              num_classes: int) -> np.ndarray:
  """The best one-to-one order (order[output] = class) for these labels
  and predictions. Only the classes that occur take part: pairing a class
  with no image gains nothing, so the others keep their places."""
  valid = predicted >= 0
  labels, predicted = labels[valid], predicted[valid]
  occurring = np.union1d(labels, predicted)  # sorted
  counts = np.zeros((len(occurring), len(occurring)))
  np.add.at(counts, (np.searchsorted(occurring, predicted),
                     np.searchsorted(occurring, labels)), 1)
  return _full_order(best_assignment(counts), occurring, num_classes)


def clearly_better(better: Scores, worse: Scores) -> bool:
  """Whether `better` beats `worse` by the margins in the module docstring,
  per image on the same images."""
  count = len(worse.correct)
  if count < MIN_IMAGES:
    return False
  gain = better.correct.astype(np.float64) - worse.correct
  error = gain.std(ddof=1) / math.sqrt(count)
  if gain.mean() >= ACCURACY_MARGIN and gain.mean() >= SE_MULTIPLE * error:
    return True
  saved = worse.loss - better.loss
  saved_error = saved.std(ddof=1) / math.sqrt(count)
  return bool(better.log_loss <= worse.log_loss / 2 and
              saved.mean() >= LOG_LOSS_MARGIN and
              saved.mean() >= SE_MULTIPLE * saved_error and
              gain.mean() >= -ACCURACY_SLACK)


def _log_probabilities(outputs: np.ndarray, kind: str) -> np.ndarray:
  """Per row, the log of each class's probability, floored; a row that is
  not finite gets the floor everywhere (it names no class)."""
  outputs = outputs.astype(np.float64)
  finite = np.isfinite(outputs).all(axis=1)
  outputs = np.where(finite[:, None], outputs, 0.0)
  if kind == "logits":
    shifted = outputs - outputs.max(axis=1, keepdims=True)
    logs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
  else:
    logs = np.log(np.clip(outputs, PROBABILITY_FLOOR, None))
  logs = np.maximum(logs, math.log(PROBABILITY_FLOOR))
  logs[~finite] = math.log(PROBABILITY_FLOOR)
  return logs.astype(np.float32)


def candidate_scales(card: card_lib.ModelCard) -> tuple:
  scales = CANDIDATE_SCALES[card.color_mode]
  return scales + (("custom",) if card.input_scale == "custom" else ())


def _with_scale(engine, card: card_lib.ModelCard, scale: str):
  """The engine, sharing its loaded model, feeding `scale` instead."""
  recipe = dict(card.preprocessing, input_scale=scale)
  if scale != "custom":
    recipe.pop("input_mean", None)
    recipe.pop("input_std", None)
  scaled = copy.copy(engine)
  scaled.card = dataclasses.replace(card, preprocessing=recipe)
  return scaled


def score_scales(engine, card: card_lib.ModelCard, eval_set: list,
                 scales: tuple) -> tuple:
  """(labels, {scale: log probabilities}) on a sample of `eval_set` spread
  over it, as large as SCORE_BYTES allows, decoded once."""
  per_image = card.num_classes * len(scales) * 4
  limit = max(2, SCORE_BYTES // per_image)
  step = max(1, math.ceil(len(eval_set) / limit))
  sample = eval_set[::step][:limit]
  engines = {scale: _with_scale(engine, card, scale) for scale in scales}
  labels, logs = [], {scale: [] for scale in scales}
  for pixels, batch_labels, _ in adopt_checks.decode_files(card, sample):
    if not len(batch_labels):
      continue
    labels.append(batch_labels)
    for scale in scales:
      logs[scale].append(_log_probabilities(
          engines[scale].outputs(pixels), card.output))
  if not labels:
    raise AdoptError("--eval_data: none of its images could be decoded")
  return (np.concatenate(labels),
          {scale: np.concatenate(values) for scale, values in logs.items()})


def _halves(labels: np.ndarray) -> np.ndarray:
  """True for the images of the first half: every other image of each
  class, so both halves hold every class."""
  first = np.zeros(len(labels), bool)
  for label in np.unique(labels):
    members = np.flatnonzero(labels == label)
    first[members[::2]] = True
  return first


def _scores(scale: str, logs: np.ndarray, labels: np.ndarray,
            order: Optional[np.ndarray]) -> Scores:
  """Scores with the outputs renamed by `order` (None: as given)."""
  rows = np.arange(len(labels))
  predicted = logs.argmax(axis=1)
  if order is None:
    return Scores(scale, None, predicted == labels, -logs[rows, labels])
  inverse = np.empty_like(order)
  inverse[order] = np.arange(len(order))
  return Scores(scale, order, order[predicted] == labels,
                -logs[rows, inverse[labels]])


def _cross_fitted(scale: str, logs: np.ndarray, labels: np.ndarray,
                  num_classes: int) -> Optional[Scores]:
  """Scores in the best order, each half scored with the order found on
  the other half; `order` is the one found on all images. None when the
  best order is the given one, or when too many classes occur."""
  predicted = logs.argmax(axis=1)
  if len(np.union1d(labels, predicted)) > MAX_ORDER_CLASSES:
    return None
  order = fit_order(labels, predicted, num_classes)
  if np.array_equal(order, np.arange(num_classes)):
    return None
  first = _halves(labels)
  correct = np.zeros(len(labels), bool)
  loss = np.zeros(len(labels), np.float32)
  for scored in (first, ~first):
    if not scored.any():
      continue
    fitted = fit_order(labels[~scored], predicted[~scored], num_classes)
    held_out = _scores(scale, logs[scored], labels[scored], fitted)
    correct[scored], loss[scored] = held_out.correct, held_out.loss
  return Scores(scale, order, correct, loss)


def _best_of(options: list) -> Scores:
  return max(options, key=lambda s: (s.accuracy, -s.log_loss))


def _text(scores: Scores) -> str:
  return f"accuracy {scores.accuracy:.3f}, log loss {scores.log_loss:.2f}"


def _class_names_flag(card: card_lib.ModelCard, order: np.ndarray) -> str:
  names = [card.class_names[k] for k in order]
  if any("," in name or name != name.strip() for name in names):
    return ("--class_names FILE holding the JSON list " +
            str(names).replace("'", '"'))
  return "--class_names " + shlex.quote(",".join(names))


def check(engine, card: card_lib.ModelCard, eval_set: list, eval_data: str,
          scale_given: bool, confirm_input_scale: bool = False,
          confirm_class_names: bool = False, say=print) -> Verdict:
  """Scores the candidate scales and class orders on `eval_set`; returns
  the Verdict, or raises AdoptError naming the fix when another scale or
  order is clearly better than the given one (or, with no scale given,
  when no scale is clearly the best).

  `engine` runs the staged model; `card` holds its scale (a placeholder
  when not `scale_given`), class names and output kind."""
  scales = candidate_scales(card)
  labels, logs = score_scales(engine, card, eval_set, scales)
  plain = {s: _scores(s, logs[s], labels, None) for s in scales}
  reordered = {s: _cross_fitted(s, logs[s], labels, card.num_classes)
               for s in scales}
  # Each scale at its best order, unless the user vouches for theirs.
  best = {}
  for scale in scales:
    other = reordered[scale]
    best[scale] = (other if other is not None and not confirm_class_names and
                   clearly_better(other, plain[scale]) else plain[scale])
  count = len(labels)
  record = {
      "images": int(count),
      "given": card.input_scale if scale_given else None,
      "scales": {s: {"accuracy": round(plain[s].accuracy, 4),
                     "log_loss": round(plain[s].log_loss, 4),
                     "accuracy_in_best_order": (
                         round(reordered[s].accuracy, 4)
                         if reordered[s] is not None else None)}
                 for s in scales}}
  say(f"eval check on {count} images of {eval_data}: " + "; ".join(
      f"{s} {_text(plain[s])}" for s in scales))
  warnings = []
  if scale_given:
    scale = card.input_scale
    rivals = [best[s] for s in scales
              if s != scale and clearly_better(best[s], best[scale])]
    fix_scale = _best_of(rivals) if rivals else None
    if fix_scale is not None and confirm_input_scale:
      warnings.append(
          f"--confirm_input_scale: input_scale {scale} kept although "
          f"--eval_data fits {fix_scale.scale} clearly better "
          f"({_text(fix_scale)} against {_text(best[scale])} on {count} "
          "images)")
      fix_scale = None
  else:
    scale, fix_scale = _measured_scale(best, count, eval_data), None
    record["chosen"] = scale
  order_fix = None
  if fix_scale is not None:
    order_fix = fix_scale.order
  elif (reordered[scale] is not None and
        clearly_better(reordered[scale], plain[scale])):
    if confirm_class_names:
      warnings.append(
          f"--confirm_class_names: the order given kept although --eval_data "
          f"fits another clearly better ({_text(reordered[scale])} against "
          f"{_text(plain[scale])} on {count} images)")
    else:
      order_fix = reordered[scale].order
  if fix_scale is None and order_fix is None:
    return Verdict(scale, record, warnings)
  raise AdoptError(_refusal(card, eval_data, scale, scale_given,
                            plain[scale], fix_scale or reordered[scale],
                            fix_scale is not None, order_fix))


def _measured_scale(best: dict, count: int, eval_data: str) -> str:
  """The scale clearly better than every other at its best order, where
  no flag gave one; else AdoptError naming --input_scale."""
  scales = list(best)
  winners = [s for s in scales
             if all(clearly_better(best[s], best[o]) for o in scales
                    if o != s)]
  if winners:
    return winners[0]
  if count < MIN_IMAGES:
    raise AdoptError(
        f"--eval_data {eval_data} has {count} images that decode, too "
        f"few to measure the input scale (at least {MIN_IMAGES}): pass "
        "--input_scale, how the model's author scaled pixels")
  ranked = sorted(scales, key=lambda s: (-best[s].accuracy,
                                         best[s].log_loss))
  scores = "; ".join(f"{s}: {_text(best[s])}" for s in ranked)
  raise AdoptError(
      f"--eval_data {eval_data} does not tell which input scale the "
      f"model expects ({scores} on {count} images): pass --input_scale, "
      "how its author scaled pixels")


def _refusal(card: card_lib.ModelCard, eval_data: str, scale: str,
             scale_given: bool, given: Scores, better: Scores,
             new_scale: bool, order: Optional[np.ndarray]) -> str:
  """The one line naming what fits clearly better than what was given,
  the flags to pass for it, and the flag that keeps the user's choice."""
  flags = [f"--input_scale {better.scale}"] if (
      new_scale or not scale_given) else []
  if order is not None:
    flags.append(_class_names_flag(card, order))
  what = " and ".join(part for part, needed in (
      (f"input_scale {better.scale}", new_scale),
      ("another class order", order is not None)) if needed)
  how = f"input_scale {scale}" + (
      "" if scale_given else " (the best of the scales)") + (
          " and the class order given" if order is not None else "")
  confirm = " or ".join(flag for flag, needed in (
      ("--confirm_input_scale", new_scale),
      ("--confirm_class_names", order is not None)) if needed)
  held_out = (", each half scored in the order found on the other"
              if order is not None else "")
  return (f"--eval_data {eval_data}: the model fits {what} clearly better "
          f"({_text(better)} against {_text(given)} with {how}, on "
          f"{len(given.correct)} images{held_out}): pass {' '.join(flags)}, "
          f"or {confirm} to keep yours")
