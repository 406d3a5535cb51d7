# torch_arena developer entry points. Two commands matter on a fresh machine:
#   make demo   - set up .venv and run the pool/ring/stock comparison on synthetic data
#   make test   - set up .venv and run the whole test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The CPU wheel of this torch lies on the development machines; an unpinned
# torch would make pip download several GB of CUDA wheels.
TORCH_PIN := torch==2.13.0
FFMPEG_LIBS := libavcodec59 libavformat59 libavfilter8 libavdevice59 libavutil57 libswscale6 libswresample4

.PHONY: all venv ffmpeg test test-fast demo bench docs clean

all: test

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) setup.cfg pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[dev,lightning,bench,spdl,docs,accelerate,torchdata,hf]"
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

# TORCH_ARENA_REQUIRE_ALL=1: a test that would skip (an extra, FFmpeg or unshare
# missing) fails instead: here everything it needs is installed.
test: venv ffmpeg
	TORCH_ARENA_REQUIRE_ALL=1 $(PY) -m pytest -q tests
	$(MAKE) --no-print-directory docs

test-fast: venv
	$(PY) -m pytest -q -m "not slow" tests

demo: venv
	$(PY) -m torch_arena demo

bench: venv ffmpeg
	$(PY) -m torch_arena bench

docs: venv
	$(PY) -m sphinx -W -q -b html docs docs/_build/html

clean:
	rm -rf $(VENV) docs/_build build *.egg-info .pytest_cache .hypothesis
