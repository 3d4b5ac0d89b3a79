# Two commands do all set-up: `make demo` and `make test`. Each creates .venv on first use.
VENV := .venv
PY := $(VENV)/bin/python
DIFFUSE := $(VENV)/bin/diffuse
DEMO_RUN := runs/shapes

.PHONY: venv demo ui test lint lint-infra tools-venv lock clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -c constraints.txt -e '.[data,airflow,dev]'
	touch $@

venv: $(VENV)/.installed

# checkov lives in its own venv: installed into .venv it downgrades packaging and botocore and breaks Airflow.
# Pinned in infra/lint-tools.txt; ~45 s to create with a warm pip cache, so `make test` creates it too.
TOOLS := .venv-tools
$(TOOLS)/.installed: infra/lint-tools.txt
	test -x $(TOOLS)/bin/python || python3 -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install -q -U pip
	$(TOOLS)/bin/python -m pip install -q -r infra/lint-tools.txt
	touch $@

tools-venv: $(TOOLS)/.installed

# The main job on the embedded default: the three Airflow DAGs in order on the shapes data (dataset_update ->
# retrain -> batch_generate), in .demo/ with SQLite for Airflow, MLflow and the prompt store; minutes per CPU:
# BENCHMARKS.md. The terminal shows a line per task; the DAGs' logs go to .demo/logs/.
demo: venv
	$(PY) -m pipeline.orchestration.demo

# The Airflow UI (http://127.0.0.1:8080) and the MLflow UI (http://127.0.0.1:5000) on the demo's state.
ui: venv
	@test -d .demo/airflow || { echo "run 'make demo' first"; exit 1; }
	AIRFLOW_HOME=$(CURDIR)/.demo/airflow AIRFLOW__CORE__DAGS_FOLDER=$(CURDIR)/dags AIRFLOW__CORE__LOAD_EXAMPLES=False \
	AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS=True DIFFUSE_WORKSPACE=$(CURDIR)/.demo \
		$(VENV)/bin/airflow api-server --host 127.0.0.1 --port 8080 & AIRFLOW_PID=$$!; \
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/.demo/mlflow.db --host 127.0.0.1 --port 5000; \
	kill $$AIRFLOW_PID 2>/dev/null || true

# pytest exits 5 when it collects nothing; that is not a failure of the suite.
test: venv tools-venv
	$(PY) -m pytest -q -ra $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

lint: venv
	$(VENV)/bin/ruff check pipeline tests bench

# Dockerfiles (hadolint), docker-compose.yaml (docker-compose config, else a structural check), Terraform,
# Kubernetes manifests and Dockerfiles (checkov, offline): the same checks `make test` runs, alone.
lint-infra: venv tools-venv
	$(PY) -m pytest -q -ra tests/test_infra.py

# Re-resolve the stack and rewrite constraints.txt (torch stays the CPU 2.13.0 build).
lock: venv
	(echo "# Pinned versions of the whole stack (one venv). Regenerate: make lock"; \
	 $(VENV)/bin/pip freeze --exclude-editable | sed 's/^torch==2.13.0+cpu$$/torch==2.13.0/') > constraints.txt

clean:
	rm -rf runs data .cache samples
