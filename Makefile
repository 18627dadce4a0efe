# Two commands do all set-up:  `make quickstart`  and  `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN := $(PY) -m grounded_diffusion
SCENES := --config experiments/scenes.yaml

.PHONY: quickstart test smoke install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The registry's torch + torchvision (CUDA builds run on CPU too); a CPU-only torch wheel
	# would not load the registry's torchvision.
	$(PY) -m pip install --quiet -e ".[test]"
	# The reference DAAM (parity test): its pinned requirements are obsolete, its code is not.
	$(PY) -m pip install --quiet --no-deps "daam==0.2.0"
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded offline default: procedural scenes -> triplet cache -> fit -> test.
quickstart: $(STAMP)
	$(RUN) predict $(SCENES)
	$(RUN) fit $(SCENES)
	$(RUN) test $(SCENES) --ckpt_path last --verbose false

test: $(STAMP)
	$(PY) -m pytest

# The whole method once at Stable Diffusion 1.5's real sizes (random weights), CPU or CUDA:
# per-stage time and peak memory (benchmarks/sd15_smoke.py).
smoke: $(STAMP)
	$(PY) benchmarks/sd15_smoke.py

clean:
	rm -rf outputs lightning_logs .pytest_cache
