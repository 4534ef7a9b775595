"""`dsv3` and `dsv3.serving` are PEP 420 namespaces that several distributions fill.

`dsv3.serving` holds the torch-free runtime from dsv3-rpc (protos/src) and the torch codec from the
core (src): one `__init__.py` in either tree would hide the other half's modules.
"""

from __future__ import annotations

from pathlib import Path

import dsv3.serving
import dsv3.serving.server
import dsv3.serving.tensor_codec

ROOT = Path(__file__).resolve().parents[2]
SHARED = ("dsv3", "dsv3/serving")  # packages more than one distribution contributes to


def _package_roots() -> list[Path]:
    roots = [ROOT / "src", ROOT / "protos" / "src"]
    roots += sorted(p for p in ROOT.glob("services/*/src") if p.is_dir())
    return roots + [p for p in [ROOT / "operator" / "src"] if p.is_dir()]


def test_no_distribution_claims_a_shared_namespace() -> None:
    claimed = [root / pkg / "__init__.py" for root in _package_roots() for pkg in SHARED]
    assert [str(p.relative_to(ROOT)) for p in claimed if p.exists()] == []


def test_serving_spans_the_rpc_distribution_and_the_core() -> None:
    """In the dev venv (editable installs) each half is imported from its own source tree."""
    assert dsv3.serving.__file__ is None  # a namespace package, not a regular one
    assert Path(dsv3.serving.server.__file__).is_relative_to(ROOT / "protos" / "src" / "dsv3" / "serving")
    assert Path(dsv3.serving.tensor_codec.__file__).is_relative_to(ROOT / "src" / "dsv3" / "serving")
