"""The committed stubs in protos/src/dsv3/rpc/v1 (dsv3-rpc) are what scripts/gen_protos.py generates now."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_are_fresh(tmp_path) -> None:
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    gen_protos = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_protos)
    generated = gen_protos.generate(tmp_path)
    committed_dir = ROOT / "protos" / "src" / "dsv3" / "rpc" / "v1"
    assert {p.name for p in generated} == {p.name for p in committed_dir.glob("*_pb2*.py*")}
    stale = [p.name for p in generated if p.read_bytes() != (committed_dir / p.name).read_bytes()]
    assert stale == [], f"stale stubs {stale}: run make protos"
