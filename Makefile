# Two commands do all set-up: `make demo` and `make test`. Each creates .venv on first use.
VENV := .venv
PY := $(VENV)/bin/python
DIFFUSE := $(VENV)/bin/diffuse
DEMO_RUN := runs/shapes

.PHONY: venv demo test lint lock clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

# The main job on the embedded default: shapes data -> train (<= 10 CPU-minutes) -> sample -> score.
demo: venv
	$(DIFFUSE) data shapes --out data/shapes --num 10000 --resolution 32
	$(DIFFUSE) train --config configs/shapes.yaml --overwrite
	$(DIFFUSE) sample --model $(DEMO_RUN)/model --num 8 --out $(DEMO_RUN)/samples \
		--prompt "a large red circle in the center on a white background" \
		--prompt "a small blue triangle in the top left corner on a black background" \
		--prompt "a large green circle in the bottom right corner on a gray background"
	$(DIFFUSE) score-shapes --model $(DEMO_RUN)/model --out $(DEMO_RUN)/adherence.json

# pytest exits 5 when it collects nothing; that is not a failure of the suite.
test: venv
	$(PY) -m pytest -q -ra $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

lint: venv
	$(VENV)/bin/ruff check pipeline tests bench

# Re-resolve the stack and rewrite constraints.txt (torch stays the CPU 2.13.0 build).
lock: venv
	(echo "# Pinned versions of the whole stack (one venv). Regenerate: make lock"; \
	 $(VENV)/bin/pip freeze --exclude-editable | sed 's/^torch==2.13.0+cpu$$/torch==2.13.0/') > constraints.txt

clean:
	rm -rf runs data .cache samples
