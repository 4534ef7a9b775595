#!/usr/bin/env bash
# Create .venv and install every dsv3 distribution editable, with dev extras.
# pip (not uv/poetry) so that torch==2.13.0 resolves to the CPU wheel on this machine's disk.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0" || .venv/bin/python -m pip install -q "torch>=2.9,<2.15"
# One pip command for every local distribution, so that `dsv3-rpc` (protos/, a dependency of the core
# and of the services) resolves to the local one rather than to an index.
editables=(-e ./protos -e '.[dev]')
for d in services/* operator; do
  [ -f "$d/pyproject.toml" ] && editables+=(-e "$d")
done
.venv/bin/python -m pip install -q "${editables[@]}"
bash scripts/install_k8s_tools.sh  # helm + kubectl for tests/operator, into .tools/bin
echo "dsv3: environment ready in .venv"
