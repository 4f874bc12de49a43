# Two commands from a fresh machine: `make demo` (the whole pipeline locally on the embedded
# defaults) and `make test`. Both create .venv and install the pinned dependencies when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
RUN_DIR ?= demo-run

# Google Cloud settings for compile/submit/images/Cloud Run (override on the command line).
PROJECT    ?= my-project
REGION     ?= us-central1
REPOSITORY ?= gemma-pets
BUCKET     ?= $(PROJECT)-gemma-pets
PRESET     ?= 31b-qlora
VERSION    ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
# The Cloud Run Job's region (its RTX PRO 6000 default runs there; the image stays in REGION).
CLOUD_RUN_REGION ?= europe-west4
# Cloud Run Job paths inside the bucket: staged weights, prepared dataset, adapter output.
MODEL_PATH   ?= weights/gemma-4-31b-it
DATASET_PATH ?= datasets/oxford-iiit-pet
OUTPUT_PATH  ?= runs/cloud-run-finetune

BENCH_DIR ?= runs/bench

.PHONY: venv demo demo-retrain test test-gpu bench rehearse compile images image-resolve cloud-run-job cloud-run-execute clean

venv: $(STAMP)
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip check
	rm -f $(VENV)/.installed-*
	touch $@

# The whole DAG under kfp.local on the offline stand-ins (tiny Gemma 4 + synthetic pets).
demo: venv
	$(PY) -m pipelines.local_run --run-dir $(RUN_DIR)

# Retraining as a schedule runs it, after `make demo`, in the same RUN_DIR (its task cache and
# folder registry): the same sources again (ingest from the cache, the champion re-evaluated
# and compared), then a quarter more images in the synthetic source (re-prepared, retrained).
demo-retrain: venv
	$(PY) -m pipelines.local_run --run-dir $(RUN_DIR)
	$(PY) -m pipelines.local_run --run-dir $(RUN_DIR) --images-per-class 50

test: venv
	$(PY) -m pytest tests -q -n 2 --maxschedchunk 2

# On a CUDA machine (the device machine runs these; see README "GPU").
test-gpu: venv
	$(PY) -m pytest tests -q -m gpu -s

# GPU speed and memory, recipe vs project defaults, on random-init real-size Gemma 4 (one CUDA
# GPU with about 140 GB for 31B; results and how to read them: docs/benchmarks.md).
bench: venv
	mkdir -p $(BENCH_DIR)
	$(PY) -m bench.bench_gpu --variant gemma-4-31b --output $(BENCH_DIR)/gemma-4-31b.json
	$(PY) -m bench.bench_gpu --variant gemma-4-e4b --output $(BENCH_DIR)/gemma-4-e4b.json

# The whole DAG under kfp.local on one CUDA GPU at real sizes (random-init checkpoints): E4B at
# full depth, then the 31B widths at the most layers the disk holds; per-step table in each
# run folder (rehearsal.md); how to read and extrapolate them: docs/rehearsal.md.
REHEARSE_DIR ?= runs/rehearse
REHEARSE_31B_LAYERS ?= auto
rehearse: venv
	$(PY) -m bench.rehearse --variant gemma-4-e4b --run-dir $(REHEARSE_DIR)/gemma-4-e4b
	rm -rf $(REHEARSE_DIR)/gemma-4-e4b/kfp $(REHEARSE_DIR)/gemma-4-e4b/inputs
	$(PY) -m bench.rehearse --variant gemma-4-31b --layers $(REHEARSE_31B_LAYERS) --run-dir $(REHEARSE_DIR)/gemma-4-31b

compile: venv
	$(PY) compile.py --preset $(PRESET) --output pipeline.yaml \
	  --image $(REGION)-docker.pkg.dev/$(PROJECT)/$(REPOSITORY)/trainer:$(VERSION)

images:
	gcloud builds submit --config cloudbuild.yaml --region $(REGION) \
	  --substitutions=_REGION=$(REGION),_REPOSITORY=$(REPOSITORY),COMMIT_SHA=$$(git rev-parse HEAD),SHORT_SHA=$$(git rev-parse --short=7 HEAD) .

# The image's pins resolved against PyPI for CPython 3.12 / manylinux x86_64 (needs PyPI access);
# the summary goes to docs/image-resolution.md.
image-resolve: venv
	$(PY) images/trainer/resolve_requirements.py pyproject.toml --output docs/image-resolution.md

cloud-run-job: venv
	$(PY) -m deploy.cloud_run_job deploy --project $(PROJECT) --region $(CLOUD_RUN_REGION) \
	  --image $(REGION)-docker.pkg.dev/$(PROJECT)/$(REPOSITORY)/trainer:$(VERSION) --bucket $(BUCKET) \
	  --model-path $(MODEL_PATH) --dataset-path $(DATASET_PATH) --output-path $(OUTPUT_PATH) \
	  $(if $(SERVICE_ACCOUNT),--service-account $(SERVICE_ACCOUNT))

cloud-run-execute: venv
	$(PY) -m deploy.cloud_run_job execute --project $(PROJECT) --region $(CLOUD_RUN_REGION)

clean:
	rm -rf $(VENV) $(RUN_DIR) .pytest_cache pipeline.yaml
