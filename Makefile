# The commands of the README: `make demo`, `make study` and `make test`. Each sets up .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Pinned CPU wheel: an unpinned torch pulls a several-GB CUDA build. GPU users install their torch
# into .venv first (see README); `setup` keeps any torch that is already there.
TORCH  ?= torch==2.13.0
# pytest-xdist workers for `make test` (one test file per worker, so a module's fixtures are built once). Each
# test runs one torch thread, so 2 keeps CI's 2 cores busy; the DDP and SLURM tests start 2 processes of their own.
TEST_WORKERS ?= 2

.PHONY: setup demo study study-replication pretrained test test-fast bench clean-demo
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[test,onnx,deepspeed]"
	touch $@

demo: setup
	$(VENV)/bin/emformer demo

# the committed CPU study (configs/sweeps/study.yaml): resumes, skips the runs committed in docs/study/sweep and
# writes docs/study/report.md; `emformer report docs/study/sweep --out docs/study` rebuilds it without training
study: setup
	$(VENV)/bin/emformer study --out docs/study

# its independent replication: the same spec on other seeds (so other eval sets); then both side by side
study-replication: setup
	$(VENV)/bin/emformer study --out docs/study-replication 'sweep.seeds=[5,6,7,8,9]'
	$(VENV)/bin/emformer replication docs/study docs/study-replication --readme README.md

# the shipped emformer-gmm-small (docs/export.md): three training stages, each starting from the one before
# (trainer.init_from), the export, its learning curve (every stage's val rows) and its benchmark section
PRETRAINED_STAGES := pretrained:pretrained pretrained_iterate:pretrained-iterate pretrained_iterate4:pretrained-iterate4
PRETRAINED_OUT    := pretrained/emformer-gmm-small
pretrained: setup
	for stage in $(PRETRAINED_STAGES); do \
	  $(VENV)/bin/emformer train configs/$${stage%%:*}.yaml --run-dir runs/$${stage##*:} || exit 1; done
	$(VENV)/bin/emformer export runs/pretrained-iterate4 --out $(PRETRAINED_OUT) --clusterer-defaults n_init=10 n_passes=16
	for stage in $(PRETRAINED_STAGES); do run=$${stage##*:}; \
	  grep '"split": "val"' runs/$$run/metrics.jsonl | sed "s/^{/{\"run\": \"$$run\", /"; \
	done > $(PRETRAINED_OUT)/curve.jsonl.tmp && mv $(PRETRAINED_OUT)/curve.jsonl.tmp $(PRETRAINED_OUT)/curve.jsonl
	$(PY) benchmarks/bench_pretrained.py --write BENCHMARKS.md

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not slurm" tests

bench: setup
	$(PY) benchmarks/run_all.py

clean-demo:
	rm -rf demo demo-quick
