# The two commands of the README; each creates or reuses .venv with the pinned stack first.
.PHONY: setup demo test bench-batching clean-demo

setup:
	@bash scripts/setup_env.sh

demo: setup
	.venv/bin/lumrec demo

test: setup
	.venv/bin/python -m pytest -q

bench-batching: setup
	.venv/bin/python benchmarks/batching.py

clean-demo:
	rm -rf out/demo
