"""bench/ as a tool: the tables in BENCHMARKS.md are what bench/report.py renders from the checked-in results,
every bench script answers --help, and bench/common.py stamps and names the results files.

bench/ is not part of the installed package: it runs from the repository root (`python -m bench...`), so these
tests run it there, in a subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# every module of bench/ that runs as a script
SCRIPTS = sorted(".".join(p.relative_to(REPO / "bench").with_suffix("").parts) for p in (REPO / "bench").rglob("*.py")
                 if 'if __name__ == "__main__":' in p.read_text())


def run_from_root(*args, code: str | None = None, timeout=300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *(["-c", code] if code else []), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


def test_benchmarks_md_tables_equal_the_rendered_results():
    r = run_from_root("-m", "bench.report", "--check")
    assert r.returncode == 0, "BENCHMARKS.md is out of date: run python -m bench.report\n" + r.stdout[-4000:] + r.stderr


def test_report_check_fails_on_a_drifted_table_and_on_a_results_file_without_one(tmp_path):
    text = (REPO / "BENCHMARKS.md").read_text()
    start = text.index("<!-- table:kernels_h200 -->")
    row = text.index("| 16k |", start)
    drifted = tmp_path / "drifted.md"
    drifted.write_text(text[:row] + text[row:].replace("486", "487", 1))
    r = run_from_root("-m", "bench.report", "--check", "--file", str(drifted))
    assert r.returncode == 1 and "+| 16k |" in r.stdout, r.stdout[-2000:] + r.stderr
    # without its block, a results file is reported
    start = text.index("<!-- table:tokenize_cpu -->")
    block_end = text.index("<!-- /table -->", start) + len("<!-- /table -->")
    missing = tmp_path / "missing.md"
    missing.write_text(text[:start] + text[block_end:])
    r = run_from_root("-m", "bench.report", "--check", "--file", str(missing))
    assert r.returncode == 1 and "tokenize_cpu" in r.stderr, r.stderr


def test_every_bench_script_answers_help():
    assert {"kernels.attention", "ngram.engine", "retrieval.search", "services.load", "report"} <= set(SCRIPTS)
    code = textwrap.dedent(f"""
        import contextlib, io, runpy, sys
        bad = []
        for name in {SCRIPTS!r}:
            sys.argv = [name, "--help"]
            out = io.StringIO()
            try:
                with contextlib.redirect_stdout(out):
                    runpy.run_module("bench." + name, run_name="__main__")
            except SystemExit as e:
                if e.code not in (0, None) or "usage: python -m bench." + name not in out.getvalue():
                    bad.append((name, e.code, out.getvalue()[:200]))
            else:
                bad.append((name, "no exit"))
        print(bad)
    """)
    r = run_from_root(code=code)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout[-3000:] + r.stderr[-3000:]


def test_results_files_are_stamped_named_per_machine_and_overwritten(tmp_path):
    code = textwrap.dedent(f"""
        import json
        from pathlib import Path
        from bench import common
        out = Path({str(tmp_path)!r})
        common.log("first run")
        p = common.save("demo", {{"a": 1, "b": [1]}}, out=out)
        assert p == out / f"demo_{{common.machine_tag()}}.json", p
        common.save("demo", {{"a": 2}}, out=out, tag="h200")
        common.save("demo", {{"a": 3}}, out=out, tag="h200")            # a rerun overwrites
        common.save("merged", {{"x": 1, "y": 1}}, out=out, tag="cpu", merge=True)
        common.save("merged", {{"y": 2}}, out=out, tag="cpu", merge=True)  # one section replaced
        print(common.machine_tag())
    """)
    head = lambda: subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,  # noqa: E731
                                  text=True).stdout.strip()
    heads = {head()}
    r = run_from_root(code=code)
    heads.add(head())   # others may commit meanwhile
    assert r.returncode == 0, r.stderr
    tag = r.stdout.split()[-1]
    assert tag == "cpu" or tag.startswith(("h", "a", "b", "l")), tag
    first = json.loads((tmp_path / f"demo_{tag}.json").read_text())
    assert first["bench"] == "demo" and first["a"] == 1
    st = first["stamp"]
    for key in ("date", "host", "cpu", "cores", "gpu", "versions", "commit", "dirty", "command"):
        assert key in st, key
    assert set(st["versions"]) == {"python", "torch", "triton", "transformers", "numpy", "faiss", "grpcio"}
    assert st["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert st["commit"] in heads
    assert (tmp_path / f"demo_{tag}.log").read_text() == "first run\n"
    assert json.loads((tmp_path / "demo_h200.json").read_text())["a"] == 3
    merged = json.loads((tmp_path / "merged_cpu.json").read_text())
    assert (merged["x"], merged["y"]) == (1, 2)
    assert merged["stamps"]["x"]["date"] <= merged["stamps"]["y"]["date"] == merged["stamp"]["date"]


def test_checked_in_results_are_one_stamped_file_per_bench_and_machine():
    names = sorted(p.name for p in (REPO / "bench" / "results").iterdir())
    for name in names:
        stem, _, ext = name.partition(".")
        assert ext in ("json", "log", "png"), name
        assert stem.rsplit("_", 1)[1] in ("cpu", "h100", "h200"), f"{name}: <bench>_<machine tag>.{ext}"
        if ext == "json":
            data = json.loads((REPO / "bench" / "results" / name).read_text())
            assert data["bench"] == stem.rsplit("_", 1)[0] and data["stamp"]["commit"], name
        else:
            assert f"{stem}.json" in names, f"{name} has no results file"
