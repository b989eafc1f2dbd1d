# spherecast — `make demo` and `make test` are all a newcomer needs (see README).
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# pip on these machines prints a warning per missing local index; keep real errors visible.
QUIET := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180

.PHONY: setup demo test lint browser bench bench-skill bench-skill-3y clean constraints

setup: $(VENV)/.installed

# The three-step recipe (DESIGN §7): CPU torch first, then the pinned set, then torch-harmonics
# without dependencies (a plain install would pull a multi-GB CUDA torch).
$(VENV)/.installed: requirements.txt constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip $(QUIET)
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0 $(QUIET)
	$(BIN)/pip install -q -c constraints.txt -r requirements.txt $(QUIET)
	$(BIN)/pip install -q --no-deps torch-harmonics==0.9.3 $(QUIET)
	$(BIN)/pip install -q --no-deps --no-build-isolation -e . $(QUIET)
	touch $@

demo: setup
	$(BIN)/spherecast demo $(DEMO_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/lint-imports

# The browser test (tests/browser) drives Debian's chromium, never a browser playwright downloads: install it
# where it is missing and this is a root shell with apt-get; otherwise say that test will be skipped.
browser:
	@if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "make browser: installing Debian's chromium (apt-get install -y chromium) for tests/browser"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	  else \
	    echo "make browser: no chromium and no root apt-get here; tests/browser will be skipped" >&2; \
	  fi; \
	fi

# pytest exits 5 when it collected nothing: that is a failure here, never a silent pass.
# Two pytest-xdist workers, a test file each at a time (its module fixtures built once): one process
# leaves a core idle most of the time (subprocess, server and I/O waits), two take the suite on a
# 2-core machine from 19 to 12 minutes (docs/benchmarks.md). PYTEST_WORKERS=0 runs in one process.
PYTEST_WORKERS ?= 2
test: setup lint browser
	rc=0; $(BIN)/pytest -q $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadfile) \
	  $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

bench: setup
	$(BIN)/python benches/forecast_speed.py
	$(BIN)/python benches/ingest.py

# The perfect-model bound on the skill bench's test period (18 min, plus about 10 simulating the coarse
# store on the first run), then skill on the shallow-water planet stated against it (attained per lead;
# 16 min, plus about 10 simulating the finer store on the first run).
bench-skill: setup
	$(BIN)/python benches/skill_bound.py --json spherecast-out/skill_swe/bound.json
	$(BIN)/python benches/skill_swe.py --bound spherecast-out/skill_swe/bound.json \
		--json spherecast-out/skill_swe/report.json

# The best recipe measured (docs/benchmarks.md, 2026-12-06): three years of planet, 12-step rollouts, 45 min of
# training, the weights averaged over the last 70 % of it, pole rows kept to the data's form (the default).
# About 3.5 h on 2 cores the first time (two 30-min stores, the bound's 20 min, the example's 45 min), 2 h once the
# stores exist.
SKILL_3Y = --out spherecast-out/skill_3y --days 1461
bench-skill-3y: setup
	$(BIN)/python benches/skill_bound.py $(SKILL_3Y) --json spherecast-out/skill_3y/bound.json
	$(BIN)/python benches/skill_swe.py $(SKILL_3Y) --budget-minutes 45 --tag r12b45-swa30 \
		--set train.rollout_steps=12 --set train.rollout_grad_first=4 --set model.embed_dim=32 \
		--set train.val_stride=4 --set train.val_score=mean --set "train.val_lead_hours=[24,120]" \
		--set train.ema_decay=0.9998 --set train.ema_start=0.3 \
		--bound spherecast-out/skill_3y/bound.json --json spherecast-out/skill_3y/report-r12b45-swa30.json

# Freeze the resolved set of a venv whose `make test` passed; `make setup` installs exactly that.
constraints: setup
	{ echo "# The resolved set \`make setup\` installs, frozen from a venv whose \`make test\` passed (pip install -c)."; \
	  echo "# Regenerate after changing requirements.txt: make constraints (on a green venv)."; \
	  $(BIN)/pip freeze | grep -v -E "^(#|-e )" | sed -E 's/^torch==([0-9.]+)\+cpu$$/torch==\1/' | sort -f; } > constraints.txt

clean:
	rm -rf $(VENV) spherecast-out .pytest_cache .ruff_cache *.egg-info
