# `make demo` and `make test` do their own set-up: they create or refresh .venv from the pinned
# requirements (quick no-op when it is current) and then run.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export YOLO_OFFLINE := 1
export MPLBACKEND := Agg

.PHONY: venv demo test test-slow test-all bench clean-demo

venv: $(STAMP)

$(STAMP): requirements.txt constraints.txt setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt -c constraints.txt 2>&1 | { grep -v "is ignored: it is neither" || true; }
	$(PY) -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | { grep -v "is ignored: it is neither" || true; }
	touch $(STAMP)

demo: $(STAMP)
	$(PY) tools/make_shards.py --with-manifest tests/fixtures/coco/manifest.jsonl
	$(PY) tools/check_shards.py --no-progress data/shards/demo
	$(PY) tools/train_scene_detector.py --output data/detector
	for c in demo demo_clip demo_clip_partners demo_no_svo; do \
		ACCELERATE_USE_CPU=1 $(PY) launch/pretrain.py --config configs/$$c.yaml --resume auto || exit 1; done
	$(PY) tools/evaluate.py --task spatial --checkpoint SA-CLIP=runs/demo/saclip --checkpoint CLIP=runs/demo/clip \
		--checkpoint CLIP+partners=runs/demo/clip_partners --checkpoint "SA-CLIP w/o SVO=runs/demo/no_svo" \
		--baseline CLIP --candidate SA-CLIP --detector-weights data/detector/scenes-yolov8n.pt --workers 2 --output runs/demo

# make test: the default suite; the tests marked slow (more multi-process runs of what the default
# suite already covers once) run with make test-slow; CI runs both.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

test-all: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	for b in shards shards_rss loader model train featcache svo positives curate; do $(PY) bench/$$b.py || exit 1; done
	$(PY) bench/gpu.py $$($(PY) -c "import torch; print('' if torch.cuda.is_available() else '--device cpu --tiny')")

clean-demo:
	rm -rf data/synthetic data/shards/demo data/demo_manifest.jsonl data/detector runs/demo
