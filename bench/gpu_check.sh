#!/usr/bin/env bash
# The device checks of issue 12 as one prepared run (for the `run` device tool or any CUDA machine with the
# project installed): GPU tests (loader CUDA path == CPU path, no host sync in the step under
# torch.cuda.set_sync_debug_mode("error"), async extraction copies == blocking ones), the training bench
# at d = 768 / 16384 latents / k = 32 / batch 4096 in bf16 with the CUDA loader, and extraction with a
# random-init CLIP ViT-B/16 at batch 256, and the step beside sparsify's. Every output lands in $OUT (default ./gpu-out), one file each.
set -u
OUT=${OUT:-gpu-out}
PY=${PY:-python}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/device.txt" 2>&1
timeout 240 "$PY" -m pytest -q -ra -m gpu -p no:cacheprovider tests > "$OUT/pytest_gpu.txt" 2>&1
timeout 300 "$PY" bench/train.py --device cuda --markdown > "$OUT/bench_train.txt" 2>&1
timeout 240 "$PY" bench/extract.py --device cuda --model clip --random-init --dtype bfloat16 --batch-size 256 \
    --limit 1792 --images-per-shard 256 --repeats 1 > "$OUT/bench_extract.txt" 2>&1
# The step beside EleutherAI sparsify's on the same shape (bf16 autocast, each trainer's CUDA default): needs
# eai-sparsify and schedulefree importable by $PY (carry their wheels: the device has no network).
if "$PY" -c "import sparsify, schedulefree" 2>/dev/null; then
    timeout 240 "$PY" bench/peers.py --device cuda --impls visionsae,sparsify --rounds 3 --reps 5 --in-place \
        --markdown > "$OUT/bench_peers_cuda.txt" 2>&1
else
    echo "sparsify not importable by $PY: carry eai-sparsify and schedulefree wheels" > "$OUT/bench_peers_cuda.txt"
fi
tail -n 3 "$OUT"/*.txt
