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

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class RetrieveQuery(_message.Message):
    __slots__ = ("text", "ids", "embedding", "exclude_doc")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_DOC_FIELD_NUMBER: _ClassVar[int]
    text: str
    ids: TokenIds
    embedding: Embedding
    exclude_doc: int
    def __init__(self, text: _Optional[str] = ..., ids: _Optional[_Union[TokenIds, _Mapping]] = ..., embedding: _Optional[_Union[Embedding, _Mapping]] = ..., exclude_doc: _Optional[int] = ...) -> None: ...

class RetrieveRequest(_message.Message):
    __slots__ = ("queries", "k", "exclude_docs", "omit_text")
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_DOCS_FIELD_NUMBER: _ClassVar[int]
    OMIT_TEXT_FIELD_NUMBER: _ClassVar[int]
    queries: _containers.RepeatedCompositeFieldContainer[RetrieveQuery]
    k: int
    exclude_docs: _containers.RepeatedScalarFieldContainer[int]
    omit_text: bool
    def __init__(self, queries: _Optional[_Iterable[_Union[RetrieveQuery, _Mapping]]] = ..., k: _Optional[int] = ..., exclude_docs: _Optional[_Iterable[int]] = ..., omit_text: _Optional[bool] = ...) -> None: ...

class Document(_message.Message):
    __slots__ = ("source", "external_id", "metadata")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    EXTERNAL_ID_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    source: str
    external_id: str
    metadata: str
    def __init__(self, source: _Optional[str] = ..., external_id: _Optional[str] = ..., metadata: _Optional[str] = ...) -> None: ...

class Neighbour(_message.Message):
    __slots__ = ("score", "chunk_id", "doc_id", "token_offset", "tokens", "continuation", "text", "continuation_text", "document")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_ID_FIELD_NUMBER: _ClassVar[int]
    DOC_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    CONTINUATION_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CONTINUATION_TEXT_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    score: float
    chunk_id: int
    doc_id: int
    token_offset: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    continuation: _containers.RepeatedScalarFieldContainer[int]
    text: str
    continuation_text: str
    document: Document
    def __init__(self, score: _Optional[float] = ..., chunk_id: _Optional[int] = ..., doc_id: _Optional[int] = ..., token_offset: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ..., continuation: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., continuation_text: _Optional[str] = ..., document: _Optional[_Union[Document, _Mapping]] = ...) -> None: ...

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
