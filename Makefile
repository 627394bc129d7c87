# The README's two commands are `make demo` and `make test`; both install first.
.PHONY: setup demo test bench bench-check lint

setup:
	bash scripts/bootstrap.sh

demo: setup
	.venv/bin/python -m boxvm.demo

test: setup
	.venv/bin/ruff check boxvm tests bench
	.venv/bin/python -m pytest -n 2 --dist loadgroup -ra --durations=15

bench: setup
	.venv/bin/python -m bench

# Fails listing each benchmark of the last run that misses its target in BENCHMARKS.md.
bench-check:
	.venv/bin/python -m bench --check

lint:
	.venv/bin/ruff check boxvm tests bench
	.venv/bin/ruff format --check boxvm tests bench
