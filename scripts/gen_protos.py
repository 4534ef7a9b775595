"""Generate the Python protobuf/gRPC stubs in protos/src/dsv3/rpc/v1 from protos/ (pinned grpcio-tools).

python scripts/gen_protos.py [--out DIR]    # DIR defaults to protos/src/ (stubs land in DIR/dsv3/rpc/v1)

The stubs belong to the torch-free distribution `dsv3-rpc` (protos/pyproject.toml); `make protos` runs
this, and tests/rpc/test_stubs.py fails when the committed ones are stale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "protos"
STUB_ROOT = PROTO_ROOT / "src"  # dsv3-rpc's package root
PINNED_GRPCIO_TOOLS = "1.85.1"


def generate(out_root: Path) -> list[Path]:
    import grpc_tools
    from grpc_tools import protoc

    version = getattr(grpc_tools, "__version__", None)
    if version is None:
        from importlib.metadata import version as dist_version

        version = dist_version("grpcio-tools")
    if version != PINNED_GRPCIO_TOOLS:
        raise SystemExit(f"grpcio-tools {version} installed; stubs are generated with {PINNED_GRPCIO_TOOLS}")
    protos = sorted((PROTO_ROOT / "dsv3").rglob("*.proto"))
    out_root.mkdir(parents=True, exist_ok=True)
    well_known = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(str(p.relative_to(PROTO_ROOT)) for p in protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((out_root / "dsv3" / "rpc" / "v1").glob("*_pb2*.py*"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=STUB_ROOT)
    files = generate(parser.parse_args().out)
    print("\n".join(str(f) for f in files), file=sys.stderr)


if __name__ == "__main__":
    main()
