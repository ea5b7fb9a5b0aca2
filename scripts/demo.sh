#!/usr/bin/env bash
# The main job, end to end, offline: generate a small labelled dataset, fine-tune
# tf_efficientnet_lite0 from its packaged ImageNet weights, export it into the BentoML
# store, serve it, send one held-out image, print the answer.
# Run through `make demo` (which sets up the venv and puts it on PATH).
set -euo pipefail
export NO_ALBUMENTATIONS_UPDATE=1 BENTOML_DO_NOT_TRACK=true
start=$(date +%s)
run_dir=runs/demo
data_dir=runs/demo-data
heldout_dir=runs/demo-heldout
model_name=convtune-demo

rm -rf "$run_dir" "$data_dir" "$heldout_dir"
python - <<PY
from data.synthetic import make_shapes_dataset
make_shapes_dataset("$data_dir", per_class=80, size=96, seed=0)
make_shapes_dataset("$heldout_dir", per_class=3, size=96, seed=1)
PY

convtune fit --data "$data_dir" --model tf_efficientnet_lite0 --pretrained auto \
  --out "$run_dir" --img-size 96 --epochs 3 --freeze-epochs 1 --batch-size 32 \
  --lr 0.05 --aug-scale-min 0.6
tag=$(convtune export "$run_dir" --name "$model_name" | tail -n 1)
echo "exported $tag"

port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
CONVTUNE_MODEL="$tag" bentoml serve service.service:Convtune --host 127.0.0.1 --port "$port" \
  > "$run_dir/serve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  curl -sf "http://127.0.0.1:$port/readyz" > /dev/null && break
  kill -0 $server 2>/dev/null || { cat "$run_dir/serve.log"; exit 1; }
  sleep 1
done

image="$heldout_dir/triangle/0000.png"
echo "POST /predict with $image (a triangle the model never saw):"
curl -sf -F "image=@$image" -F top_k=3 "http://127.0.0.1:$port/predict" | python -m json.tool
echo "done in $(( $(date +%s) - start )) s; run directory: $run_dir"
