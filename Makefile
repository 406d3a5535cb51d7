# torch_arena developer entry points. Two commands matter on a fresh machine:
#   make demo   - set up .venv and run the pool/ring/stock comparison on synthetic data
#   make test   - run the whole test suite on every torch of TORCH_ENVS, then build the docs
PYTHON ?= python3

# The torch releases the suite runs on: the ends of setup.cfg's torch range.
# Each has a venv of its own and the pins installed into it. Pin torch on every
# pip line: these builds lie on the development machines' disk, and an unpinned
# torch would make pip download several GB. torch 2.13.0 is the CPU wheel (no
# torchvision from PyPI imports beside it); torch 2.14.1 + torchvision 0.29.1
# are CUDA builds (about 5.5 GB in the venv) that run on the CPU.
TORCH_ENVS := torch2.13 torch2.14
VENV_torch2.13 := .venv
PINS_torch2.13 := torch==2.13.0
VENV_torch2.14 := .venv-torch2.14
PINS_torch2.14 := torch==2.14.1 torchvision==0.29.1

# The environment that every target but `make test` uses (`make test-fast
# TORCH_ENV=torch2.14` runs the quick tests on the other one).
TORCH_ENV ?= torch2.13
VENV  := $(VENV_$(TORCH_ENV))
PINS  := $(PINS_$(TORCH_ENV))
ifeq ($(VENV),)
$(error unknown TORCH_ENV '$(TORCH_ENV)'; one of: $(TORCH_ENVS))
endif
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS := dev,lightning,bench,spdl,docs,accelerate,torchdata,hf
FFMPEG_LIBS := libavcodec59 libavformat59 libavfilter8 libavdevice59 libavutil57 libswscale6 libswresample4

.PHONY: all venv ffmpeg test test-env test-fast demo bench docs clean

all: test

$(PY):
	$(PYTHON) -m venv $(VENV)

# The Makefile is a prerequisite so that a change of pins reaches the venvs.
$(STAMP): $(PY) setup.cfg pyproject.toml Makefile
	@echo "installing $(PINS) and torch-arena[$(EXTRAS)] into $(VENV)"
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PINS)
	$(PY) -m pip install -q $(PINS) -e ".[$(EXTRAS)]"
	# an editable install does not carry the start-up hook that reads TORCH_ARENA
	$(PY) -m torch_arena hook install
	touch $(STAMP)

venv: $(STAMP)

# spdl.io packets need FFmpeg 5's runtime libraries. Install them when missing
# and possible (root + apt); otherwise make test fails the real-packets tests.
ffmpeg:
	@if ! ldconfig -p 2>/dev/null | grep -q libavformat.so.59; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing FFmpeg 5 runtime libraries for spdl.io"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(FFMPEG_LIBS) >/dev/null) \
	      || echo "warning: could not install FFmpeg libraries; the real-packets tests will fail"; \
	  else echo "note: FFmpeg 5 libraries missing and not root; make test will fail the real-packets tests"; fi; \
	fi

# The whole suite on every environment of TORCH_ENVS (each runs even when an
# earlier one failed; any failure fails make test), then the docs, once.
test:
	@failed=; for env in $(TORCH_ENVS); do \
	  echo "=== make test: $$env ==="; \
	  $(MAKE) --no-print-directory test-env TORCH_ENV=$$env || failed="$$failed $$env"; \
	done; \
	if [ -n "$$failed" ]; then echo "make test: the suite FAILED on:$$failed"; exit 1; fi; \
	echo "make test: the suite passed on $(TORCH_ENVS)"
	$(MAKE) --no-print-directory docs

# One environment (TORCH_ENV). TORCH_ARENA_REQUIRE_ALL=1: a test that would
# skip (an extra, FFmpeg or unshare missing) fails instead: here everything it
# needs is installed. Where unshare is permitted, the suite runs in a mount
# namespace with a /dev/shm of its own, so its leftover checks see only what
# this run's processes made (other programs on the machine make and remove
# entries there meanwhile).
PRIVATE_SHM := $(shell unshare --mount true >/dev/null 2>&1 && echo yes)
IN_PRIVATE_SHM := $(if $(PRIVATE_SHM),unshare --mount sh -c 'mount -t tmpfs -o size=50% tmpfs /dev/shm && exec "$$@"' sh)
test-env: venv ffmpeg
	@echo "--- $(TORCH_ENV): $(PINS) in $(VENV)$(if $(PRIVATE_SHM), with a private /dev/shm) ---"
	TORCH_ARENA_REQUIRE_ALL=1 $(IN_PRIVATE_SHM) $(PY) -m pytest -q tests

test-fast: venv
	$(PY) -m pytest -q -m "not slow" tests

demo: venv
	$(PY) -m torch_arena demo

bench: venv ffmpeg
	$(PY) -m torch_arena bench

docs: venv
	$(PY) -m sphinx -W -q -b html docs docs/_build/html

clean:
	rm -rf $(foreach env,$(TORCH_ENVS),$(VENV_$(env))) docs/_build build *.egg-info .pytest_cache .hypothesis
