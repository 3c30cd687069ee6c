# The two commands of the README. Each does its own set-up (scripts/setup.sh is idempotent:
# after the first run it costs about a second).
.PHONY: setup demo test lint

setup:
	@bash scripts/setup.sh

demo: setup
	@.venv/bin/da3 demo

test: setup
	@.venv/bin/ruff check src tests benchmarks
	@.venv/bin/ruff format --check src tests benchmarks
	@.venv/bin/python -m pytest -q

lint: setup
	@.venv/bin/ruff check --fix src tests benchmarks
	@.venv/bin/ruff format src tests benchmarks
