"""Dockerfile and docker-compose.yml, checked by parsing (no Docker engine runs here): every command is
a valid `retrogram` invocation, the servers share the index volume the build writes, health checks ask
the gRPC health service, and the image copies what the package needs."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[2]


class _Env(dict):
    def __missing__(self, key):
        return ""


def _interpolate(text: str, env: dict) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?message} interpolation."""
    def sub(m):
        name, op, arg = m.group(1), m.group(2), m.group(3)
        v = env.get(name)
        if op == ":-":
            return v if v else arg
        if op == ":?":
            if not v:
                raise KeyError(f"{name}: {arg}")
            return v
        return v or ""
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:[-?])([^}]*))?\}", sub, text)


@pytest.fixture(scope="module")
def compose():
    text = (REPO / "docker-compose.yml").read_text()
    with pytest.raises(KeyError, match="RETROGRAM_API_KEY"):
        _interpolate(text, {})     # the servers refuse to start without a key: compose says so up front
    return yaml.safe_load(_interpolate(text, {"RETROGRAM_API_KEY": "k"}))


def _parse(argv):
    from retrogram.services.cli import build_parser

    return build_parser().parse_args([str(a) for a in argv])


def test_services_and_one_shot_build(compose):
    svcs = compose["services"]
    assert set(svcs) == {"build-index", "ngram", "retriever", "decoder"}
    b = svcs["build-index"]
    assert b["restart"] == "no"
    args = _parse(b["command"])
    assert args.command == "build-index"
    out = str(args.out)
    mounts = {m.split(":")[1]: m for m in b["volumes"]}
    assert any(out.startswith(p) for p in mounts), "build-index writes outside its volumes"
    for name in ("ngram", "retriever", "decoder"):
        s = svcs[name]
        assert s["depends_on"]["build-index"]["condition"] == "service_completed_successfully"
        a = _parse(s["command"])
        assert a.command == "serve" and a.service == name
        assert str(a.index) == out, f"{name} serves {a.index}, build-index writes {out}"
        # same named volume, mounted read-only at the same place
        vols = [v for v in s["volumes"] if v.startswith("index:")]
        assert vols and vols[0].split(":")[1] == "/index" and vols[0].endswith(":ro")
        assert any(v.startswith("index:/index") for v in b["volumes"])
        assert s["environment"]["RETROGRAM_API_KEY"] == "k"       # bound beyond loopback: keys required
        assert a.host == "0.0.0.0"
        # published on the host's loopback only
        for p in s["ports"]:
            assert p.startswith("127.0.0.1:")
        assert f"127.0.0.1:{a.port}:{a.port}" in s["ports"]
        hc = s["healthcheck"]["test"]
        assert hc[:2] == ["CMD", "retrogram"]
        h = _parse(hc[2:])
        assert h.command == "health" and h.server.endswith(f":{a.port}")
        assert h.service == f"retrogram.v1.{name.capitalize()}Service"
        assert s["stop_signal"] == "SIGTERM"
        grace = int(s["stop_grace_period"].rstrip("s"))
        assert grace > a.grace, "docker must wait longer than the server's drain"
    assert "index" in compose["volumes"]


def test_dockerfile():
    text = (REPO / "Dockerfile").read_text()
    lines = [ln for ln in re.sub(r"\\\n", " ", text).splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    instr = [(ln.split()[0].upper(), ln.split(None, 1)[1] if len(ln.split()) > 1 else "") for ln in lines]
    kinds = [k for k, _ in instr]
    assert kinds[0] == "FROM"
    assert dict(instr)["ENTRYPOINT"].strip() == '["retrogram"]'
    for k, arg in instr:
        if k == "COPY":
            for src in shlex.split(arg)[:-1]:
                if not src.startswith("--"):
                    assert (REPO / src).exists() or src == "README.md", f"COPY {src}: not in the repository"
    copied = {shlex.split(a)[0] for k, a in instr if k == "COPY"}
    import tomllib

    pkg_dirs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values()
    assert set(pkg_dirs) <= copied, f"the image misses package folders {set(pkg_dirs) - copied}"
    assert "EXPOSE" in kinds and {"50051", "50052", "50053"} <= set(dict(instr)["EXPOSE"].split())
    assert "USER" in kinds
    hc = dict(instr)["HEALTHCHECK"]
    assert '"retrogram", "health"' in hc
    ignore = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore
