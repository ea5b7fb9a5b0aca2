#!/usr/bin/env bash
# The main job on real data, offline: fine-tune tf_efficientnet_lite0 from its packaged
# ImageNet weights on ELPV (2,624 solar-cell images, 4 defect grades), with a stratified
# 75/25 train/test split; export it into the BentoML store, serve it, send one held-out
# test image, print the answer and where the evaluation report is.
# Run through `make demo` (which sets up the venv and puts it on PATH).
set -euo pipefail
export NO_ALBUMENTATIONS_UPDATE=1 BENTOML_DO_NOT_TRACK=true
start=$(date +%s)
run_dir=${RUN_DIR:-runs/demo}
model_name=elpv

labels=$(python -c 'import elpv_dataset, pathlib; print(pathlib.Path(elpv_dataset.__file__).parent / "data" / "labels.csv")')
rm -rf "$run_dir"
convtune fit --config configs/elpv.yaml --data "$labels" --out "$run_dir" "$@"
tag=$(convtune export "$run_dir" --name "$model_name" | tail -n 1)
echo "exported $tag"

port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
CONVTUNE_MODEL="$tag" bentoml serve convtune.service.service:Convtune --host 127.0.0.1 --port "$port" \
  > "$run_dir/serve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  curl -sf "http://127.0.0.1:$port/readyz" > /dev/null && break
  kill -0 $server 2>/dev/null || { cat "$run_dir/serve.log"; exit 1; }
  sleep 1
done

# A held-out test image (never used for training, checkpoint choice or calibration).
read -r image truth < <(python -c '
import json, sys
test = json.load(open(sys.argv[1]))["test"]
path, label = next(item for item in test if item[1] == "defective")
print(path, label)' "$run_dir/split.json")
echo "POST /predict with held-out test image $(basename "$image") (true grade: $truth):"
curl -sf -F "image=@$image" -F top_k=4 "http://127.0.0.1:$port/predict" | python -m json.tool
echo "test-split report: $run_dir/report.html (metrics: $run_dir/metrics.json)"
echo "done in $(( $(date +%s) - start )) s"
