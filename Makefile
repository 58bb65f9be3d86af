# Build / test entry points.  `make test` is what CI runs (via .ci/run).
#
# Two supported lines, each in its own virtual environment and constraints file:
#   .venv     Python 3.11, CPU torch 2.13.0, megatron-core 0.16.1, DeepSpeed 0.19.8 (constraints/cpu.txt):
#             the whole suite.
#   .venv312  Python 3.12, torch 2.14.1 (a CUDA build that runs on CPU), megatron-core 0.19.2 with Megatron-LM's
#             training package, DeepSpeed 0.19.8 (constraints/py312.txt): every Megatron and DeepSpeed test,
#             Megatron-LM's own pretrain() among them.

PYTHON      ?= python3
VENV        ?= .venv
VPY         := $(VENV)/bin/python
CONSTRAINTS ?= constraints/cpu.txt
EXTRAS      ?= test,deepspeed,megatron
STAMP       := $(VENV)/.installed

# Python 3.12 for the second leg: pyenv's newest 3.12 if there is one, else python3.12 on PATH.
PYTHON312      ?= $(shell ls -d $$(pyenv root 2>/dev/null)/versions/3.12.*/bin/python 2>/dev/null | tail -1 || true)
ifeq ($(strip $(PYTHON312)),)
PYTHON312      := python3.12
endif
VENV312        ?= .venv312
VPY312         := $(VENV312)/bin/python
CONSTRAINTS312 ?= constraints/py312.txt
STAMP312       := $(VENV312)/.installed
# What the second leg runs: the integrations whose APIs moved between the two Megatron-Core lines.
TESTS312       ?= tests/megatron tests/deepspeed

# DeepSpeed installs from its sdist: pre-compile no C++/CUDA ops (they JIT on demand).
export DS_BUILD_OPS := 0

.PHONY: venv venv312 test test311 test312 demo clean

venv: $(STAMP)
venv312: $(STAMP312)

$(VPY):
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --upgrade pip

$(VPY312):
	$(PYTHON312) -m venv $(VENV312)
	$(VPY312) -m pip install --upgrade pip

# Re-runs only when pyproject.toml or the constraints change (or the venv is new).
# DeepSpeed's setup.py imports torch only optionally; built in pip's isolated build
# env (no torch there) it simply pre-compiles nothing, so no --no-build-isolation.
$(STAMP): pyproject.toml $(CONSTRAINTS) | $(VPY)
	$(VPY) -m pip install -c $(CONSTRAINTS) -e '.[$(EXTRAS)]'
	touch $@

$(STAMP312): pyproject.toml $(CONSTRAINTS312) | $(VPY312)
	$(VPY312) -m pip install -c $(CONSTRAINTS312) -e '.[$(EXTRAS)]'
	touch $@

test: test311 test312

test311: venv
	$(VPY) -m pytest -q

test312: venv312
	$(VPY312) -m pytest -q $(TESTS312)

demo: venv
	$(VENV)/bin/dualpipe-plugin demo

clean:
	rm -rf $(VENV) $(VENV312) build dist *.egg-info .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
