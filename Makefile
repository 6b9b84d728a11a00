# Conveniences for developers; the README's two commands work without make.
.PHONY: demo test fast lint fmt protos bench

demo:
	bash scripts/demo.sh

test:
	bash scripts/test.sh

fast:
	bash scripts/test.sh -m "not slow"

lint:
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

fmt:
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

# Regenerate ckfs/api's modules from its .proto files (committed; CI checks them).
protos:
	.venv/bin/python -m ckfs_protos

bench:
	.venv/bin/python bench/import.py
	.venv/bin/python bench/pull.py
	.venv/bin/python bench/unpack.py
	.venv/bin/python bench/containerd.py
	.venv/bin/python bench/rpc.py
