#!/usr/bin/env bash
# The main job end to end on the embedded Fashion-MNIST sample: train, write
# the sample as PNG folders and Parquet shards, classify both on the
# DirectRunner, query the results and draw a report.
#
# Usage: ./run_local.sh [--data IDX_OR_CLASS_FOLDER] [--images DIR_OR_GLOB]
#                       [--model MODEL_DIR] [--work DIR] [--engine auto|tflite|keras|savedmodel]
#                       [-- extra flags for beam_jobs.predict]
#   Each run writes to a new folder DIR/run-YYYYmmdd-HHMMSS (DIR: local_run),
#   and DIR/latest points to the newest; earlier runs are kept.
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
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "run_local.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

source "$ROOT/scripts/ensure_venv.sh"

# A fresh folder for every run: nothing of an earlier run is replaced.
mkdir -p "$WORK"
RUN=$WORK/run-$(date +%Y%m%d-%H%M%S)
while [[ -e "$RUN" ]]; do RUN=$RUN-again; done
mkdir "$RUN"
ln -sfn "$(basename "$RUN")" "$WORK/latest"
echo "== This run's folder: $RUN ($WORK/latest points to it)"

if [[ -z "$MODEL" ]]; then
  MODEL=$RUN/model
  echo "== Training on $DATA"
  python -m model.train --data "$DATA" --output "$MODEL"
fi

if [[ -z "$IMAGES" ]]; then
  IMAGES=$RUN/images
  echo "== Writing the sample's test images as PNG class folders"
  python -m model.datasets --data "$DATA" --split test --to_png "$IMAGES"
fi

echo "== Writing them as Parquet shards"
python -m tools.make_shards "$IMAGES" "$RUN/shards" --rows_per_shard 100

echo "== Classifying the image folder on the DirectRunner"
python -m beam_jobs.predict --input "$IMAGES" --model "$MODEL" \
  --output "$RUN/predictions_images" --engine "$ENGINE" \
  --runner DirectRunner "${EXTRA[@]}"

echo "== Classifying the Parquet shards on the DirectRunner"
python -m beam_jobs.predict --input "$RUN/shards/*.parquet" --model "$MODEL" \
  --label_column label --output "$RUN/predictions_parquet" \
  --engine "$ENGINE" --runner DirectRunner "${EXTRA[@]}"

echo "== Query: python -m tools.query $RUN/predictions_parquet"
python -m tools.query "$RUN/predictions_parquet"
echo
echo "== Both inputs agree? python -m tools.query $RUN/predictions_parquet compare $RUN/predictions_images"
python -m tools.query "$RUN/predictions_parquet" compare \
  "$RUN/predictions_images" --limit 5

echo
echo "== Report: python -m tools.report $RUN/predictions_parquet --out $RUN/report"
python -m tools.report "$RUN/predictions_parquet" --out "$RUN/report"

LATEST=$WORK/latest
MODEL_SHOWN=$MODEL
[[ "$MODEL" == "$RUN/model" ]] && MODEL_SHOWN=$LATEST/model
echo
echo "== Done. This run is in $RUN ($LATEST points to it):"
[[ "$MODEL" == "$RUN/model" ]] && echo "  model/                the trained model: model.keras, model.tflite, model_card.json, training_curves.png"
[[ "$IMAGES" == "$RUN/images" ]] && echo "  images/               the sample's test images in PNG class folders"
cat <<SUMMARY
  shards/               the same images as Parquet shards (id, image, label)
  predictions_images/   predictions/, errors/ (Parquet shards) and _run.json from the image folder
  predictions_parquet/  the same from the Parquet shards
  report/index.html     the report: open it in a browser
Next (in a new shell, first: source .venv/bin/activate):
  python -m tools.query $LATEST/predictions_parquet accuracy
  python -m tools.query $LATEST/predictions_parquet misclassified
  python -m beam_jobs.predict --input 'YOUR_IMAGES/**' --model $MODEL_SHOWN --output my_predictions
SUMMARY
