# Developer entry points; README's two commands are `make setup up` and `make test`.
PY := .venv/bin/python

.PHONY: setup up demo test lint bench protos

setup:
	bash scripts/setup.sh

up:  # the whole platform as local processes (checkpoint, torchrun trainer, shards, router); --serve keeps it up
	$(PY) -m dsv3.cli up

demo:
	$(PY) -m dsv3.cli demo

test: lint
	$(PY) -m pytest -q

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

protos:  # regenerate the committed stubs in protos/src/dsv3/rpc/v1 (pinned grpcio-tools, a dev extra)
	$(PY) scripts/gen_protos.py

bench:
	$(PY) benchmarks/bench_model.py
	$(PY) benchmarks/bench_checkpoint.py
