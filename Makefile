# Each target creates/updates .venv itself, so a fresh clone needs nothing else.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-slow demo bench clean test-data

# Real volumes for the tests (Colin27 T1, AAL atlas, INIA19): Debian's mricron-data.
MRICRON := /usr/share/mricron/templates/ch2.nii.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The pinned CPU torch first: anything unpinned would pull a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,convert]'
	touch $(STAMP)

$(MRICRON):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq mricron-data

test-data: $(MRICRON)

test: $(STAMP) test-data
	$(PY) -m pytest -q -n 2 --dist loadscope --durations=10

test-slow: $(STAMP) test-data
	$(PY) -m pytest -q -m slow

demo: $(STAMP)
	$(PY) -m fedfms_jax.demo

bench: $(STAMP)
	$(PY) -m bench.run --quick

clean:
	rm -rf $(VENV)
