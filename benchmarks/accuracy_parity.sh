#!/usr/bin/env bash
# Feeds the 1,000 Fashion-MNIST t10k images to the pipeline as a PNG folder,
# as encoded-bytes Parquet and as raw-pixel Parquet, with both engines and in
# multi-processing mode, and prints each run's accuracy next to the accuracy
# model.train recorded in the card. All should be equal.
#
# Usage: benchmarks/accuracy_parity.sh [MODEL_DIR] [WORK_DIR]
#   MODEL_DIR is trained with fashion_cnn on ../shared/data if it has no card.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
source "$ROOT/scripts/ensure_venv.sh"
export TF_CPP_MIN_LOG_LEVEL=2
DATA=../shared/data/fashion-mnist
MODEL=${1:-/tmp/parity/model}
WORK=${2:-/tmp/parity/work}
rm -rf "$WORK"; mkdir -p "$WORK"
[[ -f $MODEL/model_card.json ]] || python -m model.train --data "$DATA" --output "$MODEL" --quiet
python -m model.datasets --data "$DATA" --split test --to_png "$WORK/png"
python -m tools.make_shards "$WORK/png" "$WORK/encoded" --rows_per_shard 250
python -m tools.make_shards "$WORK/png" "$WORK/raw" --rows_per_shard 250 --model "$MODEL"
for engine in tflite keras; do
  python -m beam_jobs.predict --input "$WORK/png" --model "$MODEL" --output "$WORK/png_$engine" --engine "$engine"
  python -m beam_jobs.predict --input "$WORK/encoded/*.parquet" --label_column label --model "$MODEL" --output "$WORK/encoded_$engine" --engine "$engine"
  python -m beam_jobs.predict --input "$WORK/raw/*.parquet" --label_column label --model "$MODEL" --output "$WORK/raw_$engine" --engine "$engine"
done
python -m beam_jobs.predict --input "$WORK/png" --model "$MODEL" --output "$WORK/png_multiprocess" \
  --direct_num_workers 2 --direct_running_mode multi_processing --inference_threads 1
echo "card: $(python -c "import json,sys; print(json.load(open(sys.argv[1]))['metrics'])" "$MODEL/model_card.json")"
for run in png_tflite encoded_tflite raw_tflite png_keras encoded_keras raw_keras png_multiprocess; do
  python - "$WORK/$run" <<'PY'
import json, subprocess, sys
folder = sys.argv[1]
scores = json.loads(subprocess.run([sys.executable, "-m", "tools.query", folder, "accuracy", "--json"],
                                   capture_output=True, text=True, check=True).stdout)
counts = json.load(open(folder + "/_run.json"))["counts"]
print(f"{folder.rsplit('/', 1)[1]:18s} accuracy {scores['accuracy']:.4f} on {scores['labelled']} images, "
      f"model loads {counts['model_loads']}")
PY
done
