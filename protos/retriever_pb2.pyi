from retrogram.protos import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Embedding(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class RetrieveQuery(_message.Message):
    __slots__ = ("text", "ids", "embedding", "exclude_docs")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_DOCS_FIELD_NUMBER: _ClassVar[int]
    text: str
    ids: TokenIds
    embedding: Embedding
    exclude_docs: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, text: _Optional[str] = ..., ids: _Optional[_Union[TokenIds, _Mapping]] = ..., embedding: _Optional[_Union[Embedding, _Mapping]] = ..., exclude_docs: _Optional[_Iterable[int]] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class RetrieveRequest(_message.Message):
    __slots__ = ("queries", "k", "exclude_docs", "with_text")
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_DOCS_FIELD_NUMBER: _ClassVar[int]
    WITH_TEXT_FIELD_NUMBER: _ClassVar[int]
    queries: _containers.RepeatedCompositeFieldContainer[RetrieveQuery]
    k: int
    exclude_docs: _containers.RepeatedScalarFieldContainer[int]
    with_text: bool
    def __init__(self, queries: _Optional[_Iterable[_Union[RetrieveQuery, _Mapping]]] = ..., k: _Optional[int] = ..., exclude_docs: _Optional[_Iterable[int]] = ..., with_text: _Optional[bool] = ...) -> None: ...

class Neighbour(_message.Message):
    __slots__ = ("score", "chunk_id", "doc_id", "metadata", "chunk_tokens", "continuation_tokens", "chunk_text", "continuation_text")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_ID_FIELD_NUMBER: _ClassVar[int]
    DOC_ID_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CONTINUATION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_TEXT_FIELD_NUMBER: _ClassVar[int]
    CONTINUATION_TEXT_FIELD_NUMBER: _ClassVar[int]
    score: float
    chunk_id: int
    doc_id: int
    metadata: str
    chunk_tokens: _containers.RepeatedScalarFieldContainer[int]
    continuation_tokens: _containers.RepeatedScalarFieldContainer[int]
    chunk_text: str
    continuation_text: str
    def __init__(self, score: _Optional[float] = ..., chunk_id: _Optional[int] = ..., doc_id: _Optional[int] = ..., metadata: _Optional[str] = ..., chunk_tokens: _Optional[_Iterable[int]] = ..., continuation_tokens: _Optional[_Iterable[int]] = ..., chunk_text: _Optional[str] = ..., continuation_text: _Optional[str] = ...) -> None: ...

class Neighbours(_message.Message):
    __slots__ = ("neighbours",)
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    neighbours: _containers.RepeatedCompositeFieldContainer[Neighbour]
    def __init__(self, neighbours: _Optional[_Iterable[_Union[Neighbour, _Mapping]]] = ...) -> None: ...

class RetrieveResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[Neighbours]
    def __init__(self, results: _Optional[_Iterable[_Union[Neighbours, _Mapping]]] = ...) -> None: ...
