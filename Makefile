# Two commands do all set-up:  `make quickstart`  and  `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN := $(PY) -m grounded_diffusion
SHAPES := --config experiments/shapes.yaml
WORLD := outputs/world
WEIGHTS := grounded_diffusion/shapes_world/weights
P2 := experiments/protocol2
HEAD := outputs/shapes/checkpoints/last.ckpt
CHROMIUM := /usr/bin/chromium

.PHONY: quickstart quickstart-dit protocol2 scenes world world-wide world-dit test test-fast lint format docs smoke install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The registry's torch + torchvision (CUDA builds run on CPU too); a CPU-only torch wheel
	# would not load the registry's torchvision.
	$(PY) -m pip install --quiet -e ".[test,demo,docs]"
	# The reference DAAM (parity test): its pinned requirements are obsolete, its code is not.
	$(PY) -m pip install --quiet --no-deps "daam==0.2.0"
	touch $(STAMP)

install: $(STAMP)

# Protocol I in miniature on the embedded default, the shapes world: its trained Stable Diffusion
# and oracle synthesise the triplets (seen categories) and the five test groups -> fit -> test vs DAAM.
# Last, the head is exported as a portable folder (outputs/shapes/head) for the Python API and
# the demo page: `grounded-diffusion demo --head outputs/shapes/head`.
quickstart: $(STAMP)
	$(RUN) predict $(SHAPES)
	$(RUN) fit $(SHAPES)
	$(RUN) test $(SHAPES) --ckpt_path last --verbose false
	$(RUN) export --ckpt_path $(HEAD) --out outputs/shapes/head --overwrite

# The same on the shapes world's diffusion transformer (an MM-DiT with SD3's layout, shipped):
# ours vs the joint-attention baseline.
SHAPES_DIT := $(SHAPES) --config experiments/shapes_dit.yaml
quickstart-dit: $(STAMP)
	$(RUN) predict $(SHAPES_DIT)
	$(RUN) fit $(SHAPES_DIT)
	$(RUN) test $(SHAPES_DIT) --ckpt_path last --verbose false

# Protocol II in miniature (Tab. 2), after `make quickstart`, whose head labels the synthetic set:
# grounded generation over all 20 categories -> a segmenter trained on it (and the rows with real
# scenes) -> zero-shot mIoU on rendered "real" scenes. `make protocol2 SEEDS="0 1 2"` trains each
# row's segmenter once per seed (seed 0 in <row>_lraspp, seed N in <row>_lraspp_seedN), a seed's
# four rows before the next seed's, and the table gives each row's mean ± standard deviation;
# finished runs are kept (rerun to go on after a stop; delete a run's folder to redo it).
SEEDS ?= 0
P2_ROWS := real_seen synthetic with_real_seen real_all
p2_run = outputs/protocol2/shapes_$(1)_lraspp$(if $(filter 0,$(2)),,_seed$(2))
p2_overlay = $(if $(filter synthetic,$(1)),,--config $(P2)/shapes_$(1).yaml)
# $(1): the row, $(2): the seed
p2_args = --config $(P2)/shapes_segmenter.yaml $(call p2_overlay,$(1)) --seed_everything $(2) --trainer.default_root_dir $(call p2_run,$(1),$(2))
define SEGMENTER_RUN
	test -f $(call p2_run,$(1),$(2))/zs3/report.json || { \
	  $(RUN) fit $(call p2_args,$(1),$(2)) && $(RUN) test $(call p2_args,$(1),$(2)) --ckpt_path last --verbose false; }

endef
protocol2: $(STAMP)
	@test -f $(HEAD) || { echo "error: no $(HEAD); run make quickstart first (its head labels the synthetic set)"; exit 1; }
	@for seed in $(SEEDS); do case $$seed in *[!0-9]*) echo "error: SEEDS must be whole numbers >= 0, e.g. SEEDS=\"0 1 2\", not '$$seed'"; exit 1;; esac; done
	$(RUN) predict --config $(P2)/shapes_build.yaml --ckpt_path $(HEAD)
	$(foreach seed,$(SEEDS),$(foreach row,$(P2_ROWS),$(call SEGMENTER_RUN,$(row),$(seed))))
	$(PY) -m grounded_diffusion.reports --table 2 --out outputs/protocol2/shapes_table2 \
	  $(foreach row,$(P2_ROWS),$(foreach seed,$(SEEDS),$(call p2_run,$(row),$(seed))/zs3/report.json))

# The real-image path (paper §4.1) on procedural scenes with exact masks, tiny random SD.
scenes: $(STAMP)
	$(RUN) predict --config experiments/scenes.yaml
	$(RUN) fit --config experiments/scenes.yaml
	$(RUN) test --config experiments/scenes.yaml --ckpt_path last --verbose false

# Retrain the shapes world's models that ship in grounded_diffusion/shapes_world/weights/ (VAE, then the
# text-to-image UNet + text encoder, then the oracle), then measure them.
world: $(STAMP)
	$(RUN) fit --config experiments/world/autoencoder.yaml
	$(RUN) fit --config experiments/world/text_to_image.yaml
	$(RUN) fit --config experiments/world/oracle.yaml
	$(RUN) test --config experiments/world/oracle.yaml --ckpt_path last --verbose false
	rm -rf $(WEIGHTS)/shapes-sd $(WEIGHTS)/shapes-oracle
	cp -r $(WORLD)/text_to_image/pipeline $(WEIGHTS)/shapes-sd
	cp -r $(WORLD)/oracle/segmenter $(WEIGHTS)/shapes-oracle
	$(PY) -m grounded_diffusion.shapes_world.packaging
	$(PY) -m grounded_diffusion.shapes_world.diagnostics --per-group 50

# The wide shapes world (48 categories: 8 colour words x 6 shape words), the same three fits: its
# models ship in grounded_diffusion/shapes_world/weights/shapes-wide-{sd,oracle}. On a 2-core CPU: about 80 min.
WIDE := outputs/world_wide
WIDE_VAE := --config experiments/world/autoencoder.yaml --config experiments/world/wide.yaml
WIDE_T2I := --config experiments/world/text_to_image.yaml --config experiments/world/wide.yaml
WIDE_ORACLE := --config experiments/world/oracle.yaml --config experiments/world/oracle_wide.yaml
world-wide: $(STAMP)
	$(RUN) fit $(WIDE_VAE) --trainer.default_root_dir $(WIDE)/autoencoder
	$(RUN) fit $(WIDE_T2I) --trainer.default_root_dir $(WIDE)/text_to_image --model.init_args.vae $(WIDE)/autoencoder/vae
	$(RUN) fit $(WIDE_ORACLE)
	$(RUN) test $(WIDE_ORACLE) --ckpt_path last --verbose false
	rm -rf $(WEIGHTS)/shapes-wide-sd $(WEIGHTS)/shapes-wide-oracle
	cp -r $(WIDE)/text_to_image/pipeline $(WEIGHTS)/shapes-wide-sd
	cp -r $(WIDE)/oracle/segmenter $(WEIGHTS)/shapes-wide-oracle
	$(PY) -m grounded_diffusion.shapes_world.packaging
	$(PY) -m grounded_diffusion.shapes_world.diagnostics --world shapes_wide --per-group 50

# The shapes world's MM-DiT (SD3's layout, rectified flow) over the shipped VAE: its weights ship
# in grounded_diffusion/shapes_world/weights/shapes-dit. Then Protocol I on it: make quickstart-dit.
world-dit: $(STAMP)
	$(RUN) fit --config experiments/world/text_to_image.yaml --config experiments/world/dit.yaml
	rm -rf $(WEIGHTS)/shapes-dit
	cp -r outputs/world_dit/text_to_image/pipeline $(WEIGHTS)/shapes-dit
	$(PY) -m grounded_diffusion.shapes_world.packaging
	$(PY) -m grounded_diffusion.shapes_world.diagnostics --model-id embedded/shapes-dit --per-group 50

# Debian's Chromium: the demo page's headless-browser test (tests/test_api.py).
$(CHROMIUM):
	apt-get install -y --no-install-recommends chromium || { apt-get update && apt-get install -y --no-install-recommends chromium; }

# Everything, what CI runs (.ci/run): lint and the docs build first, then every test, in two
# pytest-xdist workers of one thread each (tests/conftest.py; about 20 min on 2 CPU cores).
test: lint docs $(CHROMIUM)
	$(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder

# Unit tests only (under 3 min): no test marked `workflow` (whole CLI runs, DDP, world-model training).
test-fast: $(STAMP)
	$(PY) -m pytest -m "not workflow"

# ruff: the checks and the formatting that CI enforces; `make format` applies them.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The guides in docs/ as HTML (docs/_build/html); a warning fails the build.
docs: $(STAMP)
	$(PY) -m sphinx -W --keep-going -b html -q docs docs/_build/html

# The whole method once at Stable Diffusion 1.5's real sizes (random weights), CPU or CUDA:
# per-stage time and peak memory (benchmarks/sd15_smoke.py).
smoke: $(STAMP)
	$(PY) benchmarks/sd15_smoke.py

clean:
	rm -rf outputs lightning_logs .pytest_cache
