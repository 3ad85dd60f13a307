# Each target sets itself up on a fresh machine: it creates .venv when missing and installs the package.
# On a machine without an NVIDIA GPU, torch is pinned to the CPU build 2.13.0.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 'torch>=2.11' || echo 'torch==2.13.0')

.PHONY: train test install clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check '$(TORCH)'
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]' '$(TORCH)'
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(VENV)/bin/linear-moe train

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
