"""Operator/chart tests: make this folder's helper modules (op_helpers, kube_emulator) importable
(the suite runs with --import-mode=importlib, which leaves sys.path alone)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
