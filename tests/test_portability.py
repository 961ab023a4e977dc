"""The same pipeline built, offline, as a complete Dataflow job."""

import os

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from beam_jobs import config as config_lib
from beam_jobs import make_shards
from beam_jobs.pipeline import build_pipeline
from tests.conftest import REPO

DATAFLOW_ARGS = [
    "--runner", "DataflowRunner", "--dry_run=True", "--project",
    "fake-project", "--region", "us-central1", "--temp_location",
    "gs://fake-bucket/tmp", "--setup_file", os.path.join(REPO, "setup.py")
]


def _dataflow_job(config):
  card = config.validate()
  pipeline = beam.Pipeline(options=PipelineOptions(DATAFLOW_ARGS))
  build_pipeline(pipeline, config, card, "dryrun")
  result = pipeline.run()
  transforms = result.job.proto_pipeline.components.transforms.values()
  return {t.unique_name for t in transforms}


@pytest.mark.parametrize("form", ["images", "parquet"])
def test_dataflow_dry_run_builds_the_whole_job(tmp_path, png_dir, tiny_model,
                                               form):
  source = png_dir
  if form == "parquet":
    make_shards.make_shards(png_dir, str(tmp_path / "shards"), 100)
    source = str(tmp_path / "shards" / "*.parquet")
  names = _dataflow_job(config_lib.PredictConfig(
      source, tiny_model, str(tmp_path / "out"), label_column=(
          "label" if form == "parquet" else None),
      bigquery_table="fake-project:dataset.predictions"))
  reader = "ReadParquetImages" if form == "parquet" else "ReadImageFiles"
  for stage in (reader, "Preprocess", "RunInference", "FormatPredictions",
                "WritePredictions", "CollectErrors", "WriteErrors",
                "WritePredictionsToBigQuery", "WriteErrorsToBigQuery"):
    assert stage in names, (stage, sorted(n for n in names if "/" not in n))
  assert any(n.startswith("WritePredictionsToBigQuery/WriteToBigQuery")
             for n in names)
