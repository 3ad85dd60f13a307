# Each target sets itself up on a fresh machine: it creates .venv when missing and installs the package
# (`make train`: what training needs; `make test`: plus the test tools). On a machine without an NVIDIA
# GPU, torch is pinned to the CPU build 2.13.0.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q --disable-pip-version-check
TORCH  ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 'torch>=2.11' || echo 'torch==2.13.0')

.PHONY: train test install clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) '$(TORCH)'
	$(PIP) -e . '$(TORCH)'
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) -e '.[test]' '$(TORCH)'
	touch $@

install: $(VENV)/.installed

train: $(VENV)/.installed
	$(VENV)/bin/linear-moe train

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
