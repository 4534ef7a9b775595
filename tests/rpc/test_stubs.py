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


def test_every_contract_loads_into_one_descriptor_pool() -> None:
    """All protos share the package dsv3.rpc.v1: two messages of one name would refuse to load together
    (a process such as the operator or `dsv3 up` imports several stubs)."""
    code = (
        "import importlib, pathlib, dsv3.rpc.v1 as v1\n"
        "names = sorted(p.stem for p in pathlib.Path(v1.__path__[0]).glob('*_pb2.py'))\n"
        "[importlib.import_module('dsv3.rpc.v1.' + n) for n in names]\n"
        "print(len(names))\n"
    )
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout) == len(list((ROOT / "protos" / "dsv3" / "rpc" / "v1").glob("*.proto")))
