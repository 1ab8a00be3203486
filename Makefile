# Two commands on a fresh clone: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export TOKENIZERS_PARALLELISM := false
# A Prefect server streams flow-run logs to `prefect deployment run --watch` only with these on
export PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED := true
export PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED := true

.PHONY: setup demo test lint bench reliability clean-demo deploy-demo browser

setup: $(STAMP)

# Re-install only when the dependency declaration changes; a second run reuses the venv.
$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (Python 3.11 is required; set PYTHON=...)"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache

# The audit page's browser tests drive Debian's chromium; install it when this machine can (root + apt-get),
# else say how (the tests then fail, never skip: RSM_SKIP_BROWSER_TESTS=1 skips them out loud).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium for the browser tests (apt-get)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "note: chromium is missing; the browser tests need it: sudo apt-get install -y chromium"; fi; }

test: setup lint browser
	$(VENV)/bin/pytest -q

demo: setup
	$(PY) -m flows.demo

# Long fault-injection repetitions (>= 20 worker kills mid-shard); figures in bench/RELIABILITY.md
reliability: setup
	$(VENV)/bin/pytest -q -s -m reliability

bench: setup
	$(PY) bench/run_all.py

clean-demo:
	rm -rf outputs/demo

# The whole Prefect deployment path (server, pool, deploy, worker, run --watch) for mine-rsm/demo.
deploy-demo: setup
	bash flows/deploy_local.sh
