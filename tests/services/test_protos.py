"""The generated protobuf/gRPC modules match the .proto files, and the protos load and round-trip."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from retrogram.protos import generate

pytest.importorskip("grpc_tools")


def test_generated_modules_are_up_to_date():
    stale = generate.stale_files()
    assert not stale, f"stale generated protos: {stale}; run `python -m retrogram.protos.generate`"


def test_stale_check_detects_an_edited_proto(tmp_path, monkeypatch):
    # a copy of protos/ whose ngram.proto gained a field: the check must name the files it changes
    copy = tmp_path / "protos"
    shutil.copytree(generate.HERE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    p = copy / "ngram.proto"
    p.write_text(p.read_text().replace("  bool approx = 2;\n  repeated uint32 tokens = 3;",
                                       "  bool approx = 2;\n  repeated uint32 tokens = 3;\n  uint32 extra = 4;", 1))
    monkeypatch.setattr(generate, "HERE", copy)
    stale = generate.stale_files()
    assert "ngram_pb2.py" in stale and "ngram_pb2.pyi" in stale
    assert "common_pb2.py" not in stale
    (copy / "orphan_pb2.py").write_text("# left over\n")
    assert "orphan_pb2.py" in generate.stale_files()


def test_check_command_exit_code():
    r = subprocess.run([sys.executable, "-P", "-m", "retrogram.protos.generate", "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "up to date" in r.stdout


def test_every_proto_has_stubs_and_services():
    from retrogram.protos import ngram_pb2, retriever_pb2

    names = {p.stem for p in generate.proto_files()}
    assert {"common", "ngram", "retriever"} <= names
    for n in names:
        for suffix in generate.SUFFIXES:
            assert (generate.HERE / f"{n}{suffix}").is_file()
    ng = ngram_pb2.DESCRIPTOR.services_by_name["NgramService"]
    assert {m.name for m in ng.methods} >= {"Info", "Count", "CountMany", "CountCnf", "Prob", "Ntd", "InfgramProb",
                                           "InfgramNtd", "SearchDocs", "SearchDocsCnf", "GetDocByRank",
                                           "GetDocByIx", "ScoreSequence"}
    assert ng.methods_by_name["ScoreSequence"].server_streaming
    rt = retriever_pb2.DESCRIPTOR.services_by_name["RetrieverService"]
    assert {m.name for m in rt.methods} >= {"Info", "Retrieve"}


def test_result_messages_mirror_infini_gram_fields():
    """The response messages carry infini-gram 2.6.0's result fields under the same names."""
    from infini_gram import models
    from retrogram.protos import ngram_pb2 as pb

    pairs = [(models.CountResponse, pb.CountResponse), (models.ProbResponse, pb.ProbResponse),
             (models.InfGramProbResponse, pb.InfgramProbResponse), (models.NtdResponse, pb.NtdResponse),
             (models.InfGramNtdResponse, pb.InfgramNtdResponse), (models.DocResult, pb.DocResult),
             (models.SearchDocsResponse, pb.SearchDocsResponse), (models.DistTokenResult, pb.DistTokenResult)]
    for typed, msg in pairs:
        fields = set(typed.__annotations__)
        missing = fields - set(msg.DESCRIPTOR.fields_by_name)
        assert not missing, f"{msg.DESCRIPTOR.name} lacks {missing} of infini-gram's {typed.__name__}"


def test_messages_round_trip():
    from retrogram.protos import common_pb2, ngram_pb2

    req = ngram_pb2.CountManyRequest(packed=common_pb2.PackedQueries(ids=[1, 2, 3, 65535], lengths=[2, 2]))
    assert ngram_pb2.CountManyRequest.FromString(req.SerializeToString()) == req
    q = common_pb2.Query(text="")
    assert q.HasField("text") and not common_pb2.Query().HasField("text")
