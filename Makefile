# make demo  - set up, then run the whole story on the embedded default (Fashion-MNIST)
# make test  - set up, then lint and run the test suite (what CI runs)
.PHONY: setup demo test lint bench

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/adaloc demo --out runs/demo --force

lint:
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

test: setup lint
	.venv/bin/python -m pytest

bench: setup
	.venv/bin/python bench/lifecycle.py --out runs/lifecycle
