# Build / test entry points.  `make test` is what CI runs (via .ci/run).

PYTHON      ?= python3
VENV        ?= .venv
VPY         := $(VENV)/bin/python
CONSTRAINTS ?= constraints/cpu.txt
EXTRAS      ?= test,deepspeed,megatron
STAMP       := $(VENV)/.installed

# DeepSpeed installs from its sdist: pre-compile no C++/CUDA ops (they JIT on demand).
export DS_BUILD_OPS := 0

.PHONY: venv test demo clean

venv: $(STAMP)

$(VPY):
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --upgrade pip

# Re-runs only when pyproject.toml or the constraints change (or the venv is new).
# DeepSpeed's setup.py imports torch only optionally; built in pip's isolated build
# env (no torch there) it simply pre-compiles nothing, so no --no-build-isolation.
$(STAMP): pyproject.toml $(CONSTRAINTS) | $(VPY)
	$(VPY) -m pip install -c $(CONSTRAINTS) -e '.[$(EXTRAS)]'
	touch $@

test: venv
	$(VPY) -m pytest -q

demo: venv
	$(VENV)/bin/dualpipe-plugin demo

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
