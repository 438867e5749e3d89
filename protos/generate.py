"""Regenerate the Python modules (with .pyi type stubs) from the .proto files beside this script.

    python -m retrogram.protos.generate           # rewrite *_pb2.py, *_pb2.pyi, *_pb2_grpc.py
    python -m retrogram.protos.generate --check   # exit 1, naming the files, when they are stale

The .proto files are compiled as `retrogram/protos/NAME.proto` so that the generated modules import
each other as `retrogram.protos.NAME_pb2` (and the descriptor pool names are unique). Needs grpcio-tools
(the `dev` / `test` extras).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGE_PATH = Path("retrogram") / "protos"
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    return sorted(HERE.glob("*.proto"))


def generate_into(out_dir: Path) -> dict[str, bytes]:
    """Compile every .proto into out_dir; return {generated file name: contents}."""
    try:
        import grpc_tools
        from grpc_tools import protoc
    except ImportError:  # pragma: no cover - the dev/test extras install it
        raise SystemExit("regenerating the protos needs grpcio-tools: pip install grpcio-tools") from None
    src = out_dir / "src"
    dst = out_dir / "gen"
    (src / PACKAGE_PATH).mkdir(parents=True)
    dst.mkdir()
    protos = proto_files()
    for p in protos:
        shutil.copyfile(p, src / PACKAGE_PATH / p.name)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = ["grpc_tools.protoc", f"-I{src}", f"-I{well_known}", f"--python_out={dst}", f"--pyi_out={dst}",
            f"--grpc_python_out={dst}"] + [str(PACKAGE_PATH / p.name) for p in protos]
    rc = protoc.main(args)
    if rc != 0:
        raise SystemExit(f"protoc failed (exit {rc}) on {', '.join(p.name for p in protos)}")
    return {f.name: f.read_bytes() for f in sorted((dst / PACKAGE_PATH).iterdir()) if f.name.endswith(SUFFIXES)}


def generated_now() -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(HERE.iterdir()) if f.name.endswith(SUFFIXES)}


def stale_files() -> list[str]:
    """Generated files that differ from what the .proto files give now (or that should not exist)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate_into(Path(tmp))
    current = generated_now()
    return sorted({n for n in fresh if current.get(n) != fresh[n]} | (set(current) - set(fresh)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m retrogram.protos.generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only check that the generated files are up to date")
    args = ap.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print(f"stale generated protos in {HERE}: {', '.join(stale)}; run `python -m retrogram.protos.generate`",
                  file=sys.stderr)
            return 1
        print("generated protos are up to date")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate_into(Path(tmp))
    for name in set(generated_now()) - set(fresh):
        (HERE / name).unlink()
    for name, data in fresh.items():
        (HERE / name).write_bytes(data)
    print(f"wrote {len(fresh)} files to {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
