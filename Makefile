# triplet: reproduce the triplet-loss study on CUB-200-2011, then go past it.
# `make` (or `make help`) lists the targets. Every experiment target depends on real files, so a
# finished run is skipped and an interrupted one resumes from its last checkpoint.

.DEFAULT_GOAL := help
SHELL := /bin/bash
.DELETE_ON_ERROR:
# Run files are results, never intermediates to clean up.
.SECONDARY:

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

# Variables a user can override: make exp1 BACKBONE=resnet34 DEVICE=cuda EPOCHS=2
BACKBONE ?= resnet18
DATA_DIR ?= data
DEVICE ?= auto
EPOCHS ?=
IMAGE_SIZE ?= 224
WORKERS ?= -1
WEIGHTS ?= imagenet
SPLIT ?= official
NPROC ?= 1
RESULTS ?= results
# make custom IMAGES=my_photos (a folder of class subfolders) or IMAGES=my_photos.csv (path,label[,split])
IMAGES ?=

# A run folder names every override that changes its numbers (make exp1 EPOCHS=2 writes
# exp1-resnet18-e2), so a quick try never stands in for the real run in exp1-resnet18.
RUN_TAG := $(if $(EPOCHS),-e$(EPOCHS))$(if $(filter-out 224,$(IMAGE_SIZE)),-s$(IMAGE_SIZE))$(if $(filter-out imagenet,$(WEIGHTS)),-w$(notdir $(basename $(WEIGHTS))))$(if $(filter-out official,$(SPLIT)),-$(SPLIT))

# Training and evaluation start with tcmalloc preloaded where the machine has it (Debian/Ubuntu:
# apt install libtcmalloc-minimal4): glibc's malloc faults a CPU step's activations in again every
# step, and CPU epochs take a third longer with it (docs/speed.md). ALLOCATOR= runs them without;
# ALLOCATOR=libjemalloc.so.2 (a library) or ALLOCATOR="LD_PRELOAD=... VAR=..." (assignments) with another.
ifeq ($(origin ALLOCATOR),undefined)
ALLOCATOR := $(shell $(PYTHON) -m triplet.machine --allocator 2>/dev/null)
endif
override ALLOCATOR := $(if $(findstring =,$(ALLOCATOR)),$(ALLOCATOR),$(if $(ALLOCATOR),LD_PRELOAD=$(ALLOCATOR)))
RUN_PY := $(strip $(ALLOCATOR) $(PY))

# Checked before anything runs: make splits a path with a space into two, and torchrun's own error
# for a bad NPROC is a traceback.
$(foreach v,DATA_DIR RESULTS,$(if $(word 2,$($(v))),$(error $(v)="$($(v))" holds a space, which make splits into two paths; use a path without one (a link: ln -s "$($(v))" name))))
ifeq ($(shell [[ "$(NPROC)" =~ ^[1-9][0-9]*$$ ]] && echo ok),)
$(error NPROC=$(NPROC): must be a whole number of processes per machine, 1 or more)
endif

PREPARED := $(DATA_DIR)/prepared/$(SPLIT)-r256-val0.1-seed0/prepare.json
TRAIN := $(strip $(ALLOCATOR) $(if $(filter-out 1,$(NPROC)),$(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC),$(PY))) scripts/train.py
RUN_OPTIONS := --split $(SPLIT) --device $(DEVICE) --image-size $(IMAGE_SIZE) --workers $(WORKERS) --weights $(WEIGHTS)
COMMON := --data-dir $(DATA_DIR) $(RUN_OPTIONS)

# The study's table (exp1-6) and our own recipe (exp7). EPOCHS, when set, overrides the epochs.
exp1_ARGS := --epochs 20 --lr 0.001 --batch-size 32
exp2_ARGS := --epochs 20 --lr 0.002 --batch-size 32
exp3_ARGS := --epochs 20 --lr 0.001 --batch-size 64
exp4_ARGS := --epochs 20 --lr 0.002 --batch-size 64
exp5_ARGS := --epochs 60 --lr 0.001 --batch-size 32
exp6_ARGS := --epochs 60 --lr 0.001 --batch-size 64
exp7_ARGS := --epochs 30 --lr 0.0001 --batch-size 64 --mining semihard --samples-per-class 4 --margin 0.2 --scheduler cosine
EXPERIMENTS := exp1 exp2 exp3 exp4 exp5 exp6 exp7

##@ Set-up and tests
## help: list the targets (the default goal)
help:
	@awk 'BEGIN {FS = ": "} /^##@/ {printf "\n%s\n", substr($$0, 5)} /^## / {sub(/^## /, ""); split($$0, a, ": "); printf "  %-16s %s\n", a[1], substr($$0, length(a[1]) + 3)}' $(MAKEFILE_LIST)
	@echo; echo "  Variables: BACKBONE=$(BACKBONE) DATA_DIR=$(DATA_DIR) DEVICE=$(DEVICE) EPOCHS=$(EPOCHS) IMAGE_SIZE=$(IMAGE_SIZE) WORKERS=$(WORKERS) WEIGHTS=$(WEIGHTS) SPLIT=$(SPLIT) NPROC=$(NPROC) RESULTS=$(RESULTS)"
	@echo "  Train and evaluate start with: $(or $(ALLOCATOR),the C library's malloc (apt install libtcmalloc-minimal4 for faster CPU runs)); ALLOCATOR= for malloc"

## setup: create .venv with the pinned requirements (re-runs only when requirements.txt changes)
setup: $(VENV)/.installed
$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

## test: run the test suite (CPU, offline, a few minutes)
test: setup
	$(PY) -m pytest -q

##@ Data
## data: download CUB-200-2011 (1.1 GB, MD5-checked), extract safely and build the prepared copy
data: $(PREPARED)
$(PREPARED): | setup
	$(PY) scripts/prepare_data.py --data-dir $(DATA_DIR) --split $(SPLIT)

##@ The study (exp1-6) and beyond (exp7); BACKBONE=resnet18|resnet34 (any torchvision model for your own runs)
## exp1: 20 epochs, lr 0.001, batch 32
## exp2: 20 epochs, lr 0.002, batch 32
## exp3: 20 epochs, lr 0.001, batch 64
## exp4: 20 epochs, lr 0.002, batch 64
## exp5: 60 epochs, lr 0.001, batch 32 (the study ran it on ResNet18)
## exp6: 60 epochs, lr 0.001, batch 64 (the study ran it on ResNet18)
## exp7: our recipe: online semi-hard mining in PK batches (16 classes x 4), margin 0.2, cosine lr
# metrics.json named too: under .SECONDARY a deleted one would not be remade while tsne.png is up to date
$(EXPERIMENTS): %: $(RESULTS)/%-$(BACKBONE)$(RUN_TAG)/metrics.json $(RESULTS)/%-$(BACKBONE)$(RUN_TAG)/tsne.png

# results/expN-BACKBONE[RUN_TAG]/: train (resuming if interrupted) -> evaluate -> plots.
define experiment_rules
$(RESULTS)/$(1)-%/metrics.json: $(PREPARED)
	$(TRAIN) $(COMMON) --backbone $$(firstword $$(subst -, ,$$*)) $($(1)_ARGS) $(if $(EPOCHS),--epochs $(EPOCHS)) --out $$(@D) --resume
	$(RUN_PY) scripts/evaluate.py --run $$(@D) --device $(DEVICE) --workers $(WORKERS)
endef
$(foreach e,$(EXPERIMENTS),$(eval $(call experiment_rules,$(e))))

$(RESULTS)/%/tsne.png: $(RESULTS)/%/metrics.json
	$(PY) scripts/plot_embeddings.py --run $(@D)

## baseline: evaluate the untrained model every experiment starts from (seed 0, as train.py): what training adds
baseline: $(RESULTS)/baseline-$(BACKBONE)$(RUN_TAG)/metrics.json
$(RESULTS)/baseline-%/metrics.json: $(PREPARED)
	$(RUN_PY) scripts/evaluate.py --run $(@D) --checkpoint none --backbone $(firstword $(subst -, ,$*)) --weights $(WEIGHTS) \
	    --data-dir $(DATA_DIR) --split $(SPLIT) --image-size $(IMAGE_SIZE) --device $(DEVICE) --workers $(WORKERS)

ALL_TRAINED := $(foreach e,exp1 exp2 exp3 exp4,$(foreach b,resnet18 resnet34,$(RESULTS)/$(e)-$(b))) \
               $(RESULTS)/exp5-resnet18 $(RESULTS)/exp6-resnet18 $(RESULTS)/exp7-resnet18 $(RESULTS)/exp7-resnet34
ALL_RUNS := $(foreach run,$(ALL_TRAINED),$(run)/metrics.json $(run)/tsne.png) \
            $(RESULTS)/baseline-resnet18/metrics.json $(RESULTS)/baseline-resnet34/metrics.json
## all: the whole study on CUB: exp1-4 x both backbones, exp5-6, exp7 x both, report, export, bench
all: $(ALL_RUNS)
	$(MAKE) report export bench

##@ Your own images (docs/own-images.md)
ifneq ($(word 2,$(IMAGES)),)
$(error IMAGES="$(IMAGES)" holds a space, which make splits into two paths; rename the folder, link it (ln -s "$(IMAGES)" photos), or run the scripts directly as docs/own-images.md shows)
endif
CUSTOM_NAME = $(basename $(notdir $(patsubst %/,%,$(IMAGES))))
CUSTOM_DATA = $(DATA_DIR)/$(CUSTOM_NAME)
CUSTOM_RUN = $(RESULTS)/$(CUSTOM_NAME)-$(BACKBONE)$(RUN_TAG)
CUSTOM_MODEL = exports/$(CUSTOM_NAME)-$(BACKBONE)$(RUN_TAG).onnx
# A CSV by its suffix in any case (photos.CSV from a spreadsheet); make has no lower-case function.
CUSTOM_CSV = $(filter .csv,$(subst C,c,$(subst S,s,$(subst V,v,$(suffix $(IMAGES))))))
CUSTOM_SOURCE = $(if $(CUSTOM_CSV),--manifest,--image-folder) $(IMAGES)
# Offline triplets work from two classes up; a cosine schedule and a small lr suit a pretrained trunk.
CUSTOM_ARGS ?= --epochs $(or $(EPOCHS),30) --lr 0.0001 --batch-size 32 --margin 0.2 --scheduler cosine
## custom: IMAGES=DIR|FILE.csv [BACKBONE=resnet50]: prepare, train (resuming), evaluate, plots, report, ONNX + INT8
custom: | setup
	@test -n "$(IMAGES)" || { echo "make custom: set IMAGES=DIR (one subfolder per class) or IMAGES=FILE.csv"; exit 2; }
	$(PY) scripts/prepare_data.py $(CUSTOM_SOURCE) --data-dir $(CUSTOM_DATA) --split $(SPLIT)
	$(TRAIN) --data-dir $(CUSTOM_DATA) $(RUN_OPTIONS) --backbone $(BACKBONE) $(CUSTOM_ARGS) --out $(CUSTOM_RUN) --resume
	$(RUN_PY) scripts/evaluate.py --run $(CUSTOM_RUN) --device $(DEVICE) --workers $(WORKERS)
	$(PY) scripts/plot_embeddings.py --run $(CUSTOM_RUN)
	$(PY) scripts/report.py --results $(RESULTS)
	$(PY) scripts/export_onnx.py --run $(CUSTOM_RUN) --out $(CUSTOM_MODEL) --int8
	@echo; echo "next: $(PY) scripts/search.py --model $(CUSTOM_MODEL) --gallery $(if $(CUSTOM_CSV),DIR,$(IMAGES)) --query PHOTO.jpg"

##@ Reporting and deployment
## report: results/REPORT.md, every run beside the study's published numbers
report: | setup
	$(PY) scripts/report.py --results $(RESULTS)

## export: the best run (test Precision@1) to exports/*.onnx, verified against torch, plus INT8
export: | setup
	$(PY) scripts/export_onnx.py --results $(RESULTS) --int8

## bench: onnxruntime fp32 / INT8 versus PyTorch inference benchmark
bench: | setup
	$(PY) scripts/benchmark_onnx.py --out $(RESULTS)/onnx_benchmark.json

## gpu-check: on a CUDA machine, every GPU path in under 10 minutes, offline (results/gpu_check.md)
gpu-check: | setup
	$(PY) scripts/gpu_check.py --out $(RESULTS)/gpu_check.json --workdir $(RESULTS)/gpu_check

## bench-train: the suite's training step versus a straightforward implementation
bench-train: | setup
	$(PY) scripts/benchmark_train.py --out $(RESULTS)/train_benchmark.json$(if $(ALLOCATOR),, --allocator none)

##@ Serving
SERVE_MODEL ?= exports/demo-resnet18.onnx
SERVE_GALLERY ?= $(DEMO_DATA)/prepared/official-r37-val0.25-seed0/images
PORT ?= 8000
INDEX ?= exact
## serve: the find-similar web page on http://127.0.0.1:8000/ (after `make demo`; SERVE_MODEL= SERVE_GALLERY= PORT= INDEX=faiss)
serve: | setup
	$(PY) scripts/serve.py --model $(SERVE_MODEL) --gallery $(SERVE_GALLERY) --port $(PORT) --index $(INDEX)

## bench-search: exact versus faiss flat/HNSW/IVF search on 1e4-1e6 random vectors (a few minutes)
bench-search: | setup
	$(PY) scripts/benchmark_search.py --out $(RESULTS)/search_benchmark.json

##@ Demo
# A 10-class synthetic set at 32 px (docs/demo.md: why this set and recipe, and the gain across seeds).
DEMO_DATA := $(DATA_DIR)/demo
DEMO_RUN := $(RESULTS)/demo-resnet18
DEMO_SET := --classes 10 --per-class 150 --synthetic-size 48
DEMO_SPLIT := --resize 37 --val-fraction 0.25
DEMO_MODEL := --weights none --image-size 32
DEMO_SEED ?= 0
# auto: bf16 where the CPU has it natively, else fp32 (docs/demo.md measures both)
DEMO_PRECISION ?= auto
DEMO_RECIPE := --epochs 40 --lr 0.001 --scheduler cosine --batch-size 40 --samples-per-class 4 --mining semihard \
               --margin 0.2 --crop-scale 0.5
# The study's exp1 recipe (offline random triplets, margin 1, constant lr) on the same set and epochs.
DEMO_STUDY_RECIPE := --epochs 40 --lr 0.001 --batch-size 32 --mining none --margin 1.0 --crop-scale 0.5
DEMO_STUDY_RUN := $(RESULTS)/demo-study-resnet18
# $(call demo_train,RECIPE,RUN_DIR): write the demo set (deterministic), train on it, evaluate, and evaluate the
# run's own starting point.
define demo_train
$(PY) scripts/prepare_data.py --synthetic --data-dir $(DEMO_DATA) $(DEMO_SET)
$(PY) scripts/prepare_data.py --data-dir $(DEMO_DATA) $(DEMO_SPLIT)
$(RUN_PY) scripts/train.py --data-dir $(DEMO_DATA) $(DEMO_SPLIT) $(DEMO_MODEL) $(1) --seed $(DEMO_SEED) \
    --precision $(DEMO_PRECISION) --out $(2) --force
$(RUN_PY) scripts/evaluate.py --run $(2) --precision $(DEMO_PRECISION)
$(RUN_PY) scripts/evaluate.py --run $(2) --checkpoint none --precision $(DEMO_PRECISION)
endef
## demo: the whole chain offline on a synthetic set (prepare, train, evaluate, plots, report, ONNX, inference)
demo: | setup
	$(call demo_train,$(DEMO_RECIPE),$(DEMO_RUN))
	$(PY) scripts/plot_embeddings.py --run $(DEMO_RUN)
	$(PY) scripts/report.py --results $(RESULTS)
	$(PY) scripts/report.py --demo-table $(DEMO_RUN)
	$(PY) scripts/export_onnx.py --run $(DEMO_RUN) --out exports/demo-resnet18.onnx --int8 --calibration-images 100 --max-drop 100
	$(PY) scripts/search.py --model exports/demo-resnet18.onnx --gallery $(DEMO_DATA)/prepared/official-r37-val0.25-seed0/images \
	    --query $(DEMO_DATA)/CUB_200_2011/images/003.*/*_0001_*.jpg --top-k 5
	@echo; echo "demo done: run folder $(DEMO_RUN)/ (metrics.json, metrics_untrained.json, history.csv, curves.png, tsne.png, retrieval.png)"; \
	 echo "report $(RESULTS)/REPORT.md, models exports/demo-resnet18.onnx and exports/demo-resnet18.int8.onnx"; \
	 echo "see what it finds: make serve (then open http://127.0.0.1:8000/)"

## demo-study: the study's recipe (random triplets, margin 1) on the same set, beside it in REPORT.md
demo-study: | setup
	$(call demo_train,$(DEMO_STUDY_RECIPE),$(DEMO_STUDY_RUN))
	$(PY) scripts/report.py --results $(RESULTS)
	$(PY) scripts/report.py --demo-table $(DEMO_STUDY_RUN)

## readme: rewrite docs/scripts.md from every --help and, after make demo, the README's demo table and figures (tests check both)
readme: | setup
	UPDATE_README=1 $(PY) -m pytest -q tests/test_readme.py

## clean: remove caches (never results/ or data/)
clean:
	rm -rf .pytest_cache
	find . -name __pycache__ -type d -not -path "./.venv/*" -prune -exec rm -rf {} +

.PHONY: help setup test data $(EXPERIMENTS) baseline all custom report export bench gpu-check bench-train demo demo-study serve bench-search readme clean
