"""Batch image classification with Apache Beam.

Usage:
  python -m beam_jobs.predict --input IMAGE_DIR_OR_GLOB --model MODEL_DIR \
      --output OUTPUT_DIR [--engine tflite|onnx|keras] [Beam flags, e.g. --runner]
  python -m beam_jobs.predict --input 'shards/*.parquet' --label_column label ...

Writes OUTPUT_DIR/predictions/*.parquet, OUTPUT_DIR/errors/*.parquet and
OUTPUT_DIR/_run.json, which lists them.
"""

import collections
import contextlib
import dataclasses
import logging
import sys
import time
from typing import Optional

import pyarrow.parquet as pq

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.options.pipeline_options import SetupOptions

from beam_jobs import config as config_lib
from beam_jobs import contracts
from beam_jobs import model_staging
from beam_jobs import output_folder
from beam_jobs import output_lock
from beam_jobs import outputs
from beam_jobs import preflight
from beam_jobs import worker_watchdog
from beam_jobs.pipeline import build_pipeline
from beam_jobs.pipeline import counts_duplicate_ids
from beam_jobs.progress import ProgressReporter
from beam_jobs.progress import runs_locally
from model import card as card_lib
from imagebatch import cli
from imagebatch import paths


# 2: the manifest lists the result set's files (beam_jobs/output_folder.py);
# 3: the shards sit in predictions/ and errors/, and are listed by their
# paths in the folder.
MANIFEST_VERSION = 3


def _metric_value(result) -> int:
  value = result.committed if result.committed is not None else result.attempted
  return int(getattr(value, "count", value) or 0)


class PipelineError(RuntimeError):
  """The pipeline itself failed; its outputs were not committed."""


def read_counts(pipeline_result) -> tuple:
  """From Beam metrics: (inputs, predictions, errors, skips and model loads;
  predictions with a label that matched a class and with one that did not).
  """
  counts = dict.fromkeys(contracts.COUNTERS + (contracts.MODEL_LOADS,), 0)
  labels = dict.fromkeys(contracts.LABEL_COUNTERS, 0)
  metrics = pipeline_result.metrics().query(MetricsFilter())
  for counter in metrics["counters"]:
    if counter.key.metric.namespace != contracts.METRICS_NAMESPACE:
      continue
    for totals in (counts, labels):
      if counter.key.metric.name in totals:
        totals[counter.key.metric.name] += _metric_value(counter)
  return counts, labels


def read_duplicate_ids(pipeline_result) -> int:
  """Rows whose id an earlier row of the run already had (0 when uncounted)."""
  metrics = pipeline_result.metrics().query(MetricsFilter().with_name(
      contracts.DUPLICATE_IDS))
  return sum(_metric_value(counter) for counter in metrics["counters"]
             if counter.key.metric.namespace == contracts.METRICS_NAMESPACE)


def _duplicate_ids(config: config_lib.PredictConfig,
                   pipeline_result) -> Optional[int]:
  """Repeated ids for the manifest: 0 where ids are unique by construction,
  None where they were not counted (--no_duplicate_count)."""
  if counts_duplicate_ids(config):
    return read_duplicate_ids(pipeline_result)
  unique = not counts_duplicate_ids(
      dataclasses.replace(config, count_duplicate_ids=True))
  return 0 if unique else None


def run(config: config_lib.PredictConfig, beam_args=None,
        progress: Optional[ProgressReporter] = None) -> dict:
  """Checks, runs the pipeline to the end, and commits its results; returns
  the manifest (for a Dataflow dry run, what was built).

  The run holds the output folder's lock from before the pipeline starts
  until its manifest is written; beam_jobs/output_folder.py says what it may
  replace and delete there. On a local runner, progress lines go to stderr
  every `config.progress_seconds` unless `progress` brings its own reporter.
  """
  options = PipelineOptions(config_lib.with_default_runner(beam_args))
  plan = preflight.check(config, options)
  if plan.dry_run:
    return _dry_run(plan, options)
  config = plan.config
  if progress is None and config.progress_seconds and runs_locally(options):
    progress = ProgressReporter(config.progress_seconds)
  run_id = output_folder.new_run_id()
  with output_lock.OutputLock(config.output, run_id) as lock:
    # The folder again, now that no other run can change it.
    state = output_folder.inspect(config.output)
    output_folder.check(state, plan.card.model_id, config.overwrite,
                        config.skip_existing,
                        preflight.predictions_schema(config, plan.card))
    keep = state.kept_predictions() if config.skip_existing else []
    if plan.staging:
      _stage_model(plan.staging)
    started = time.time()
    pipeline = beam.Pipeline(options=options)
    build_pipeline(pipeline, config, plan.card, run_id,
                   *_skip_arguments(config, keep), progress=progress)
    with worker_watchdog.workers_end_with_this_process(
        options, runs_locally(options)):
      result = _run_pipeline(pipeline, config.output, run_id, progress, lock)
    manifest = _manifest(plan, run_id, beam_args, result,
                         time.time() - started)
    _commit(state, manifest, keep, config.overwrite, lock)
  return manifest


def _stage_model(staging: model_staging.ModelStaging) -> None:
  """Copies a local model folder where Dataflow's workers read it."""
  try:
    model_staging.stage(staging)
  except Exception as error:  # pylint: disable=broad-except
    message = str(error).strip().splitlines()[0][:300] if str(error) else ""
    raise PipelineError(
        f"could not stage --model {staging.source} to "
        f"{staging.destination} for Dataflow's workers: "
        f"{type(error).__name__}: {message}; nothing was submitted"
    ) from error


def _run_pipeline(pipeline, output: str, run_id: str, progress,
                  lock: output_lock.OutputLock):
  """Runs the pipeline to the end; if it fails, its files go (they were
  never listed) and the earlier results stay. Should that cleaning fail,
  the lock stays too, and the next run cleans up."""
  try:
    with progress or contextlib.nullcontext():
      result = pipeline.run()
      result.wait_until_finish()
    return result
  except Exception as error:  # pylint: disable=broad-except
    logging.exception("pipeline failed")
    lock.keep()
    output_folder.discard_run(output, run_id)
    lock.release()
    message = str(error).strip().splitlines()[0][:300] if str(error) else ""
    raise PipelineError(f"the pipeline failed, nothing was committed to "
                        f"{output}: {type(error).__name__}: {message}"
                       ) from error


def _manifest(plan: preflight.Plan, run_id: str, beam_args, result,
              elapsed: float) -> dict:
  """The run's manifest, but for the fields that describe the folder."""
  card = plan.card
  counts, labels = read_counts(result)
  return {
      "manifest_version": MANIFEST_VERSION,
      "run_id": run_id,
      "model_id": card.model_id,
      "model": card_lib.card_summary(card),
      "class_names": list(card.class_names),
      "arguments": dataclasses.asdict(plan.config),
      "beam_args": list(beam_args or []),
      "counts": counts,
      # Of the predictions: labels that named a class (by name or index)
      # and labels that matched none; the rest came without one.
      "true_labels": {"matched": labels[contracts.LABELLED],
                      "unmatched": labels[contracts.UNMATCHED_LABELS]},
      "duplicate_ids": _duplicate_ids(plan.config, result),
      # With --write_embeddings: the column's D and the layer it holds.
      "embedding": (outputs.embedding_manifest(card)
                    if plan.config.write_embeddings else None),
      "elapsed_seconds": round(elapsed, 3),
      "images_per_second": round(counts["inputs"] / elapsed, 1) if elapsed
                           else None,
      "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
  }


def _commit(state: output_folder.FolderState, manifest: dict, keep: list,
            overwrite: bool, lock: output_lock.OutputLock) -> None:
  """Lists this run's shards in the manifest, checks that every input is
  a prediction or an error row and that the shards hold exactly the rows
  counted, and commits."""
  try:
    keep = output_folder.move_kept(state.output, keep)
    manifest.update(output_folder.plan_commit(
        state, manifest["run_id"], keep, overwrite, lock.inherited))
  except output_folder.FolderError as error:
    raise PipelineError(str(error)) from None
  except OSError as error:
    lock.keep()
    raise PipelineError(
        f"could not commit to {state.output}: {type(error).__name__}: "
        f"{error}; its earlier results stand") from error
  counts = manifest["counts"]
  manifest["accounted"] = (
      counts["inputs"] == counts["predictions"] + counts["errors"] and
      manifest["written"] == {outputs.PREDICTIONS_PREFIX: counts["predictions"],
                              outputs.ERRORS_PREFIX: counts["errors"]})
  try:
    output_folder.commit(state.output, manifest)
  except OSError as error:
    # A full disk, say. The lock stays, so the next run cleans up this
    # run's files; until then the folder reads as before, or as this run
    # if only the deleting failed.
    lock.keep()
    raise PipelineError(
        f"could not commit to {state.output}: {type(error).__name__}: "
        f"{error}; its earlier results stand unless {outputs.MANIFEST_FILE} "
        f"now names run {manifest['run_id']}") from error


def _skip_arguments(config: config_lib.PredictConfig, keep: list) -> tuple:
  """build_pipeline's skip_files and skip_rows for the kept shards."""
  rows = [entry.get("rows") for entry in keep]
  return ([paths.join(config.output, entry["name"]) for entry in keep],
          None if None in rows else sum(rows))


def _dry_run(plan: preflight.Plan, options) -> dict:
  """Builds the Dataflow job and submits nothing (Dataflow's --dry_run).

  Nothing is written: no lock, no manifest. A remote input or output is
  not listed (that needs the network), so with a gs:// output the job is
  built without the --skip_existing join.
  """
  config = plan.config
  setup = options.view_as(SetupOptions)
  if setup.requirements_file and not setup.requirements_cache:
    # Beam would pip-download the requirements to stage them: network.
    setup.requirements_cache = "skip"
  keep = (plan.folder.kept_predictions()
          if config.skip_existing and plan.folder else [])
  pipeline = beam.Pipeline(options=options)
  build_pipeline(pipeline, config, plan.card, output_folder.new_run_id(),
                 *_skip_arguments(config, keep))
  result = pipeline.run()
  job = getattr(result, "job", None)
  return {
      "dry_run": True,
      "transforms": len(job.proto_pipeline.components.transforms) if job
                    else None,
      "unchecked": [f"--{flag} {value}" for flag, value in (
          ("input", config.input), ("input_list", config.input_list),
          ("output", config.output)) if value and paths.is_remote(value)],
      "model_staging": plan.staging.destination if plan.staging else None,
  }


def dry_run_line(report: dict, output: str) -> str:
  unchecked = (f"; not checked offline: {', '.join(report['unchecked'])}"
               if report["unchecked"] else "")
  staged = (f"; --model would be staged to {report['model_staging']}, and "
            "was not" if report.get("model_staging") else "")
  return (f"dry run: the Dataflow job was built ({report['transforms']} "
          f"transforms) and not submitted; nothing was written to {output}"
          f"{staged}{unchecked}")


def error_rate_problem(manifest: dict, output: str,
                       max_error_rate: Optional[float]) -> Optional[str]:
  """Why the run failed its error budget (--max_error_rate; by default,
  every input failed), naming the commonest reasons; None if it did not."""
  counts = manifest["counts"]
  inputs, errors = counts["inputs"], counts["errors"]
  if not errors:
    return None
  rate = errors / inputs
  if errors < inputs and (max_error_rate is None or rate <= max_error_rate):
    return None
  budget = ("every input failed" if errors == inputs else
            f"{rate:.2%} of inputs failed, above --max_error_rate "
            f"{max_error_rate:g}")
  reasons = ", ".join(f"{reason} ({count})" for reason, count in
                      commonest_errors(output, manifest))
  return f"{budget} ({errors} of {inputs}); commonest: {reasons}"


def commonest_errors(output: str, manifest: dict, top: int = 3) -> list:
  """(stage: reason, count) of the run's commonest error kinds, read from
  the error shards its manifest lists, a record batch at a time."""
  reasons = collections.Counter()
  for entry in manifest["files"][outputs.ERRORS_PREFIX]:
    with paths.open_file(paths.join(output, entry["name"])) as handle:
      for batch in pq.ParquetFile(handle).iter_batches(
          columns=["stage", "error"]):
        for stage, error in zip(batch.column(0).to_pylist(),
                                batch.column(1).to_pylist()):
          reasons[f"{stage}: {str(error).split(':', 1)[0][:80]}"] += 1
  return reasons.most_common(top)


def summary_lines(manifest: dict) -> list:
  """The run in a few lines: counts, time, and what the labels matched."""
  counts = manifest["counts"]
  skipped = (f" ({counts['skipped']} already predicted, skipped)"
             if counts["skipped"] else "")
  lines = [f"{counts['inputs']} inputs{skipped}: {counts['predictions']} "
           f"predictions, {counts['errors']} errors, {counts['model_loads']} "
           f"model load(s) in {manifest['elapsed_seconds']:.1f}s "
           f"({manifest['images_per_second']} images/s)"]
  labels = manifest["true_labels"]
  if labels["matched"] or labels["unmatched"]:
    lines.append(f"true labels{_labels_from(manifest['arguments'])}: "
                 f"{labels['matched']} match a class of the model, "
                 f"{labels['unmatched']} match none")
  return lines


def _labels_from(arguments: dict) -> str:
  """Where the true labels came from, when no flag named it."""
  if arguments.get("label_column") is not None or arguments.get(
      "input_format") not in ("parquet", config_lib.LIST_FORMAT):
    return ""
  return (f" (from the {contracts.DEFAULT_LABEL_COLUMN!r} column, as "
          "--label_column was not given; --label_column '' reads none)")


def label_warning(manifest: dict) -> Optional[str]:
  """A warning when given labels matched no class, else None."""
  unmatched = manifest["true_labels"]["unmatched"]
  if not unmatched:
    return None
  return (f"{unmatched} true labels match none of the model's "
          f"{len(manifest['class_names'])} classes by name or index; they "
          "are kept in the source_label column and not scored")


def duplicate_warning(manifest: dict, output: str) -> Optional[str]:
  """A warning when rows repeated an id, else None."""
  if not manifest["duplicate_ids"]:
    return None
  return (f"{manifest['duplicate_ids']} rows repeat an id an earlier row had "
          f"(duplicate_ids in {outputs.MANIFEST_FILE}; python -m tools.query "
          f"{output} shows them)")


def adoption_warnings(manifest: dict) -> list:
  """What model.adopt warned when it made the model, repeated at each run
  (the card's `adopted.warnings`, in the manifest's model summary)."""
  return [f"model.adopt warned: {text}"
          for text in manifest["model"].get("adoption_warnings", [])]


def next_commands(output: str) -> list:
  return [cli.program("query", output),
          cli.program("query", output, "accuracy"),
          cli.program("report", output, "--out",
                      outputs.report_dir_for(output))]


def main(argv=None) -> int:
  """The command line. Filters library noise off this process's stderr."""
  try:
    config, beam_args = config_lib.parse_args(argv)
  except config_lib.ConfigError as error:
    print(f"beam_jobs.predict: error: {error}", file=sys.stderr)
    return 2
  cli.quiet_libraries(config.verbose)
  output = config.output  # As the user wrote it; the plan's is absolute.
  try:
    manifest = run(config, beam_args)
  except (config_lib.ConfigError, output_folder.FolderError) as error:
    print(f"beam_jobs.predict: error: {error}", file=sys.stderr)
    return 2
  except PipelineError as error:
    print(f"beam_jobs.predict: error: {error}", file=sys.stderr)
    return 1
  if manifest.get("dry_run"):
    print(dry_run_line(manifest, output))
    return 0
  for line in summary_lines(manifest):
    print(line)
  for warning in (label_warning(manifest), duplicate_warning(manifest, output),
                  *adoption_warnings(manifest)):
    if warning:
      print(f"beam_jobs.predict: warning: {warning}", file=sys.stderr)
  commands = next_commands(output)
  cli.print_next(f"{output} ({outputs.PREDICTIONS_PREFIX}/, "
                 f"{outputs.ERRORS_PREFIX}/, {outputs.MANIFEST_FILE})",
                 commands)
  if not manifest["accounted"]:
    print("beam_jobs.predict: error: inputs != predictions + errors, or the "
          f"shards do not hold what was counted; see {outputs.MANIFEST_FILE}",
          file=sys.stderr)
    return 1
  problem = error_rate_problem(manifest, manifest["arguments"]["output"],
                               config.max_error_rate)
  if problem:
    print(f"beam_jobs.predict: error: {problem}; the results are written "
          f"({cli.program('query', output, 'errors')} lists the failures)",
          file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
