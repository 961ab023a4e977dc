#!/usr/bin/env bash
# The main job end to end on the embedded Fashion-MNIST sample: train, write
# the sample as PNG folders and Parquet shards, classify both on the
# DirectRunner, and query the results.
#
# Usage: ./run_local.sh [--data IDX_OR_CLASS_FOLDER] [--images DIR_OR_GLOB]
#                       [--model MODEL_DIR] [--work DIR] [--engine auto|tflite|keras|savedmodel]
#                       [-- extra flags for beam_jobs.predict]
#   --model skips training and serves that model folder.
#   --images classifies those images instead of the sample's test split.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)

DATA=sample_data/fashion-mnist
IMAGES=""
MODEL=""
WORK=local_run
ENGINE=auto
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --data) DATA=$2; shift 2 ;;
    --images) IMAGES=$2; shift 2 ;;
    --model) MODEL=$2; shift 2 ;;
    --work) WORK=$2; shift 2 ;;
    --engine) ENGINE=$2; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "run_local.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

source "$ROOT/scripts/ensure_venv.sh"
export TF_CPP_MIN_LOG_LEVEL=2

if [[ -z "$MODEL" ]]; then
  MODEL=$WORK/model
  echo "== Training on $DATA"
  python -m model.train --data "$DATA" --output "$MODEL" --quiet
fi

if [[ -z "$IMAGES" ]]; then
  IMAGES=$WORK/images
  rm -rf "$IMAGES"
  echo "== Writing the sample's test images as PNG class folders"
  python -m model.datasets --data "$DATA" --split test --to_png "$IMAGES"
fi

rm -rf "$WORK/shards"
echo "== Writing them as Parquet shards"
python -m tools.make_shards "$IMAGES" "$WORK/shards" --rows_per_shard 100

echo "== Classifying the image folder on the DirectRunner"
python -m beam_jobs.predict --input "$IMAGES" --model "$MODEL" \
  --output "$WORK/predictions_images" --engine "$ENGINE" --overwrite \
  --runner DirectRunner "${EXTRA[@]}"

echo "== Classifying the Parquet shards on the DirectRunner"
python -m beam_jobs.predict --input "$WORK/shards/*.parquet" --model "$MODEL" \
  --label_column label --output "$WORK/predictions_parquet" \
  --engine "$ENGINE" --overwrite --runner DirectRunner "${EXTRA[@]}"

echo "== Query: python -m tools.query $WORK/predictions_parquet"
python -m tools.query "$WORK/predictions_parquet"
echo
echo "== Both inputs agree? python -m tools.query $WORK/predictions_parquet compare $WORK/predictions_images"
python -m tools.query "$WORK/predictions_parquet" compare "$WORK/predictions_images" --limit 5

echo
echo "== Report: python -m tools.report $WORK/predictions_parquet --out $WORK/report"
python -m tools.report "$WORK/predictions_parquet" --out "$WORK/report"
