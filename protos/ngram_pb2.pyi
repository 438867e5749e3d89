from retrogram.protos import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TokenizeRequest(_message.Message):
    __slots__ = ("texts",)
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, texts: _Optional[_Iterable[str]] = ...) -> None: ...

class DetokenizeResponse(_message.Message):
    __slots__ = ("texts",)
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, texts: _Optional[_Iterable[str]] = ...) -> None: ...

class CountRequest(_message.Message):
    __slots__ = ("query",)
    QUERY_FIELD_NUMBER: _ClassVar[int]
    query: _common_pb2.Query
    def __init__(self, query: _Optional[_Union[_common_pb2.Query, _Mapping]] = ...) -> None: ...

class CountResponse(_message.Message):
    __slots__ = ("count", "approx", "tokens")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    APPROX_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    count: int
    approx: bool
    tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, count: _Optional[int] = ..., approx: _Optional[bool] = ..., tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class CountManyRequest(_message.Message):
    __slots__ = ("queries", "packed")
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    queries: _containers.RepeatedCompositeFieldContainer[_common_pb2.Query]
    packed: _common_pb2.PackedQueries
    def __init__(self, queries: _Optional[_Iterable[_Union[_common_pb2.Query, _Mapping]]] = ..., packed: _Optional[_Union[_common_pb2.PackedQueries, _Mapping]] = ...) -> None: ...

class CountManyResponse(_message.Message):
    __slots__ = ("counts", "approx")
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    APPROX_FIELD_NUMBER: _ClassVar[int]
    counts: _containers.RepeatedScalarFieldContainer[int]
    approx: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, counts: _Optional[_Iterable[int]] = ..., approx: _Optional[_Iterable[bool]] = ...) -> None: ...

class Disjunction(_message.Message):
    __slots__ = ("terms",)
    TERMS_FIELD_NUMBER: _ClassVar[int]
    terms: _containers.RepeatedCompositeFieldContainer[_common_pb2.Query]
    def __init__(self, terms: _Optional[_Iterable[_Union[_common_pb2.Query, _Mapping]]] = ...) -> None: ...

class Cnf(_message.Message):
    __slots__ = ("clauses",)
    CLAUSES_FIELD_NUMBER: _ClassVar[int]
    clauses: _containers.RepeatedCompositeFieldContainer[Disjunction]
    def __init__(self, clauses: _Optional[_Iterable[_Union[Disjunction, _Mapping]]] = ...) -> None: ...

class CountCnfRequest(_message.Message):
    __slots__ = ("cnf", "max_clause_freq", "max_diff_tokens")
    CNF_FIELD_NUMBER: _ClassVar[int]
    MAX_CLAUSE_FREQ_FIELD_NUMBER: _ClassVar[int]
    MAX_DIFF_TOKENS_FIELD_NUMBER: _ClassVar[int]
    cnf: Cnf
    max_clause_freq: int
    max_diff_tokens: int
    def __init__(self, cnf: _Optional[_Union[Cnf, _Mapping]] = ..., max_clause_freq: _Optional[int] = ..., max_diff_tokens: _Optional[int] = ...) -> None: ...

class ProbRequest(_message.Message):
    __slots__ = ("prompt", "cont_id")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CONT_ID_FIELD_NUMBER: _ClassVar[int]
    prompt: _common_pb2.Query
    cont_id: int
    def __init__(self, prompt: _Optional[_Union[_common_pb2.Query, _Mapping]] = ..., cont_id: _Optional[int] = ...) -> None: ...

class ProbResponse(_message.Message):
    __slots__ = ("prompt_cnt", "cont_cnt", "prob")
    PROMPT_CNT_FIELD_NUMBER: _ClassVar[int]
    CONT_CNT_FIELD_NUMBER: _ClassVar[int]
    PROB_FIELD_NUMBER: _ClassVar[int]
    prompt_cnt: int
    cont_cnt: int
    prob: float
    def __init__(self, prompt_cnt: _Optional[int] = ..., cont_cnt: _Optional[int] = ..., prob: _Optional[float] = ...) -> None: ...

class InfgramProbResponse(_message.Message):
    __slots__ = ("prompt_cnt", "cont_cnt", "prob", "suffix_len")
    PROMPT_CNT_FIELD_NUMBER: _ClassVar[int]
    CONT_CNT_FIELD_NUMBER: _ClassVar[int]
    PROB_FIELD_NUMBER: _ClassVar[int]
    SUFFIX_LEN_FIELD_NUMBER: _ClassVar[int]
    prompt_cnt: int
    cont_cnt: int
    prob: float
    suffix_len: int
    def __init__(self, prompt_cnt: _Optional[int] = ..., cont_cnt: _Optional[int] = ..., prob: _Optional[float] = ..., suffix_len: _Optional[int] = ...) -> None: ...

class NtdRequest(_message.Message):
    __slots__ = ("prompt", "max_support")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_SUPPORT_FIELD_NUMBER: _ClassVar[int]
    prompt: _common_pb2.Query
    max_support: int
    def __init__(self, prompt: _Optional[_Union[_common_pb2.Query, _Mapping]] = ..., max_support: _Optional[int] = ...) -> None: ...

class DistTokenResult(_message.Message):
    __slots__ = ("cont_cnt", "prob")
    CONT_CNT_FIELD_NUMBER: _ClassVar[int]
    PROB_FIELD_NUMBER: _ClassVar[int]
    cont_cnt: int
    prob: float
    def __init__(self, cont_cnt: _Optional[int] = ..., prob: _Optional[float] = ...) -> None: ...

class NtdResponse(_message.Message):
    __slots__ = ("prompt_cnt", "result_by_token_id", "approx")
    class ResultByTokenIdEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: DistTokenResult
        def __init__(self, key: _Optional[int] = ..., value: _Optional[_Union[DistTokenResult, _Mapping]] = ...) -> None: ...
    PROMPT_CNT_FIELD_NUMBER: _ClassVar[int]
    RESULT_BY_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    APPROX_FIELD_NUMBER: _ClassVar[int]
    prompt_cnt: int
    result_by_token_id: _containers.MessageMap[int, DistTokenResult]
    approx: bool
    def __init__(self, prompt_cnt: _Optional[int] = ..., result_by_token_id: _Optional[_Mapping[int, DistTokenResult]] = ..., approx: _Optional[bool] = ...) -> None: ...

class InfgramNtdResponse(_message.Message):
    __slots__ = ("prompt_cnt", "result_by_token_id", "approx", "suffix_len")
    class ResultByTokenIdEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: DistTokenResult
        def __init__(self, key: _Optional[int] = ..., value: _Optional[_Union[DistTokenResult, _Mapping]] = ...) -> None: ...
    PROMPT_CNT_FIELD_NUMBER: _ClassVar[int]
    RESULT_BY_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    APPROX_FIELD_NUMBER: _ClassVar[int]
    SUFFIX_LEN_FIELD_NUMBER: _ClassVar[int]
    prompt_cnt: int
    result_by_token_id: _containers.MessageMap[int, DistTokenResult]
    approx: bool
    suffix_len: int
    def __init__(self, prompt_cnt: _Optional[int] = ..., result_by_token_id: _Optional[_Mapping[int, DistTokenResult]] = ..., approx: _Optional[bool] = ..., suffix_len: _Optional[int] = ...) -> None: ...

class SearchDocsRequest(_message.Message):
    __slots__ = ("query", "maxnum", "max_disp_len")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    MAXNUM_FIELD_NUMBER: _ClassVar[int]
    MAX_DISP_LEN_FIELD_NUMBER: _ClassVar[int]
    query: _common_pb2.Query
    maxnum: int
    max_disp_len: int
    def __init__(self, query: _Optional[_Union[_common_pb2.Query, _Mapping]] = ..., maxnum: _Optional[int] = ..., max_disp_len: _Optional[int] = ...) -> None: ...

class SearchDocsCnfRequest(_message.Message):
    __slots__ = ("cnf", "maxnum", "max_disp_len", "max_clause_freq", "max_diff_tokens")
    CNF_FIELD_NUMBER: _ClassVar[int]
    MAXNUM_FIELD_NUMBER: _ClassVar[int]
    MAX_DISP_LEN_FIELD_NUMBER: _ClassVar[int]
    MAX_CLAUSE_FREQ_FIELD_NUMBER: _ClassVar[int]
    MAX_DIFF_TOKENS_FIELD_NUMBER: _ClassVar[int]
    cnf: Cnf
    maxnum: int
    max_disp_len: int
    max_clause_freq: int
    max_diff_tokens: int
    def __init__(self, cnf: _Optional[_Union[Cnf, _Mapping]] = ..., maxnum: _Optional[int] = ..., max_disp_len: _Optional[int] = ..., max_clause_freq: _Optional[int] = ..., max_diff_tokens: _Optional[int] = ...) -> None: ...

class DocResult(_message.Message):
    __slots__ = ("doc_ix", "doc_len", "disp_len", "needle_offset", "metadata", "token_ids", "blocked", "shard")
    DOC_IX_FIELD_NUMBER: _ClassVar[int]
    DOC_LEN_FIELD_NUMBER: _ClassVar[int]
    DISP_LEN_FIELD_NUMBER: _ClassVar[int]
    NEEDLE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    BLOCKED_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    doc_ix: int
    doc_len: int
    disp_len: int
    needle_offset: int
    metadata: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    blocked: bool
    shard: int
    def __init__(self, doc_ix: _Optional[int] = ..., doc_len: _Optional[int] = ..., disp_len: _Optional[int] = ..., needle_offset: _Optional[int] = ..., metadata: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., blocked: _Optional[bool] = ..., shard: _Optional[int] = ...) -> None: ...

class SearchDocsResponse(_message.Message):
    __slots__ = ("cnt", "approx", "idxs", "documents")
    CNT_FIELD_NUMBER: _ClassVar[int]
    APPROX_FIELD_NUMBER: _ClassVar[int]
    IDXS_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    cnt: int
    approx: bool
    idxs: _containers.RepeatedScalarFieldContainer[int]
    documents: _containers.RepeatedCompositeFieldContainer[DocResult]
    def __init__(self, cnt: _Optional[int] = ..., approx: _Optional[bool] = ..., idxs: _Optional[_Iterable[int]] = ..., documents: _Optional[_Iterable[_Union[DocResult, _Mapping]]] = ...) -> None: ...

class GetDocByRankRequest(_message.Message):
    __slots__ = ("s", "rank", "max_disp_len")
    S_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    MAX_DISP_LEN_FIELD_NUMBER: _ClassVar[int]
    s: int
    rank: int
    max_disp_len: int
    def __init__(self, s: _Optional[int] = ..., rank: _Optional[int] = ..., max_disp_len: _Optional[int] = ...) -> None: ...

class GetDocByIxRequest(_message.Message):
    __slots__ = ("doc_ix", "max_disp_len")
    DOC_IX_FIELD_NUMBER: _ClassVar[int]
    MAX_DISP_LEN_FIELD_NUMBER: _ClassVar[int]
    doc_ix: int
    max_disp_len: int
    def __init__(self, doc_ix: _Optional[int] = ..., max_disp_len: _Optional[int] = ...) -> None: ...

class ScoreSequenceRequest(_message.Message):
    __slots__ = ("query", "block_size")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    query: _common_pb2.Query
    block_size: int
    def __init__(self, query: _Optional[_Union[_common_pb2.Query, _Mapping]] = ..., block_size: _Optional[int] = ...) -> None: ...

class ScoreSequenceChunk(_message.Message):
    __slots__ = ("offset", "prob", "suffix_len", "prompt_cnt", "cont_cnt", "tokens")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    PROB_FIELD_NUMBER: _ClassVar[int]
    SUFFIX_LEN_FIELD_NUMBER: _ClassVar[int]
    PROMPT_CNT_FIELD_NUMBER: _ClassVar[int]
    CONT_CNT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    offset: int
    prob: _containers.RepeatedScalarFieldContainer[float]
    suffix_len: _containers.RepeatedScalarFieldContainer[int]
    prompt_cnt: _containers.RepeatedScalarFieldContainer[int]
    cont_cnt: _containers.RepeatedScalarFieldContainer[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, offset: _Optional[int] = ..., prob: _Optional[_Iterable[float]] = ..., suffix_len: _Optional[_Iterable[int]] = ..., prompt_cnt: _Optional[_Iterable[int]] = ..., cont_cnt: _Optional[_Iterable[int]] = ..., tokens: _Optional[_Iterable[int]] = ...) -> None: ...
