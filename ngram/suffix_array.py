"""The suffix-array code (queries, and the build's packing), compiled with numba `njit(nogil=True,
cache=True)` over the memory-mapped shard files; the Triton attention kernels are `retrogram.kernels`.

Everything here works on bytes, exactly as infini-gram's C++ engine does: a shard's `tokenized.K` is read
as a byte array (tokens little-endian, `w` bytes each), `table.K` as a byte array of `ptr_size`-byte
little-endian pointers (byte offsets into `tokenized.K`) sorted by the byte order of the suffixes they
point at, and a query is the byte string of its token ids. A "range" is the half-open interval of ranks
[start, end) of the suffixes that begin with the query; its length is the query's count in that shard.

Shards are passed as one int64 table (one row per shard, columns below) holding the addresses of the
mapped files, turned back into arrays inside compiled code by `_bytes_at`. numba's dispatcher unboxes
every array argument on each call (~0.4 us each, more for tuples or typed lists of memmaps); a single
table keeps the per-call overhead of a query near one microsecond whatever the number of shards. The
Engine owns the mappings and keeps them alive as long as the table is used.

The GIL is released in every function (nogil=True), so queries from several threads run in parallel.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, types
from numba.extending import intrinsic
from llvmlite import ir

# Columns of the shard table. BK_ADDR / BK_BYTES: the shard's prefix buckets (see prefix_buckets; 0 when none).
DS_ADDR, DS_SIZE, SA_ADDR, PTR_SIZE, TOK_CNT, OD_ADDR, DOC_CNT, MT_ADDR, MT_SIZE, OM_ADDR, BK_ADDR, BK_BYTES = range(12)
TABLE_COLUMNS = 12
LOCKSTEP = 32        # count_many: binary searches advanced together, so that their cache misses overlap

NO_TOKEN = -1        # "the suffix ends here" (the end of tokenized.K) when reading the token after a match
UNKNOWN = -2         # in ntd's divide and conquer: the boundary token is not known yet
CNF_SEED = 19260817  # infini-gram's fixed seed for subsampling CNF clauses


def _pointer_from_address(ty):
    """An intrinsic taking an int64 address to a pointer of numba type ty (the inverse of ndarray.ctypes.data)."""

    @intrinsic
    def pointer(typingctx, address):
        sig = types.CPointer(ty)(types.int64)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(types.CPointer(ty)))

        return sig, codegen

    return pointer


_u8_pointer = _pointer_from_address(types.uint8)
_i64_pointer = _pointer_from_address(types.int64)


@intrinsic
def _prefetch(typingctx, address):
    """Ask the CPU to start loading the cache line at an int64 address (llvm.prefetch, read, keep)."""
    sig = types.void(types.int64)

    def codegen(context, builder, signature, args):
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = builder.module.declare_intrinsic("llvm.prefetch", [i8p], fnty)
        builder.call(fn, [builder.inttoptr(args[0], i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always")
def _bytes_at(address, size):
    return numba.carray(_u8_pointer(address), size)


@njit(inline="always")
def _i64s_at(address, size):
    return numba.carray(_i64_pointer(address), size)


@njit(inline="always")
def _shard(table, s):
    """(tokenized bytes, table bytes, pointer size, token count) of shard s."""
    row = table[s]
    return (_bytes_at(row[DS_ADDR], row[DS_SIZE]), _bytes_at(row[SA_ADDR], row[TOK_CNT] * row[PTR_SIZE]),
            row[PTR_SIZE], row[TOK_CNT])


@njit(inline="always")
def _ptr(sa, ptr_size, rank):
    """The byte offset stored at `rank` of the suffix array (ptr_size little-endian bytes)."""
    base = rank * ptr_size
    p = 0
    for k in range(ptr_size):
        p |= np.int64(sa[base + k]) << (8 * k)
    return p


@njit(inline="always")
def _token_at(ds, p, w):
    """The token id stored at byte p, or NO_TOKEN at the end of the shard."""
    if p >= ds.shape[0]:
        return NO_TOKEN
    t = 0
    for k in range(w):
        t |= np.int64(ds[p + k]) << (8 * k)
    return t


@njit(inline="always")
def _compare(ds, p, q, lo_byte, hi_byte, known):
    """Compare the suffix at byte p with the query bytes q[lo_byte:hi_byte], given that their first
    `known` bytes agree. Returns (sign, lcp): sign < 0 when the suffix is smaller (a suffix that runs
    out first is smaller), 0 when the query is a prefix of the suffix."""
    n = ds.shape[0]
    m = hi_byte - lo_byte
    k = known
    while k < m:
        if p + k >= n:
            return -1, k
        a = ds[p + k]
        b = q[lo_byte + k]
        if a != b:
            return (-1 if a < b else 1), k
        k += 1
    return 0, m


@njit(inline="always")
def _any_match(ds, sa, ptr_size, q, lo_byte, hi_byte, lo, hi, known):
    """Three-way binary search for any suffix in [lo, hi) that begins with q[lo_byte:hi_byte]:
    (found, lo, mid, hi, llcp, rlcp) with mid a match when found, else lo == hi the insertion point.
    llcp / rlcp: the query's lcp with the suffix left of lo (virtual when none) / at hi."""
    llcp = known
    rlcp = known
    mid = 0
    while lo < hi:
        mid = (lo + hi) >> 1
        c, l = _compare(ds, _ptr(sa, ptr_size, mid), q, lo_byte, hi_byte, min(llcp, rlcp))
        if c < 0:
            lo = mid + 1
            llcp = l
        elif c > 0:
            hi = mid
            rlcp = l
        else:
            return True, lo, mid, hi, llcp, rlcp
    return False, lo, mid, hi, llcp, rlcp


@njit(inline="always")
def _occurs(table, q, lo_byte, hi_byte):
    """Whether q[lo_byte:hi_byte] occurs in any shard: the search stops at the first match it meets,
    without finding the ends of the range (a third of a count's work, or less)."""
    for s in range(table.shape[0]):
        ds, sa, ps, n = _shard(table, s)
        lo, hi, kn = _start_range(table, s, q, lo_byte, hi_byte, 0, n, 0)
        if hi_byte == lo_byte or _any_match(ds, sa, ps, q, lo_byte, hi_byte, lo, hi, kn)[0]:
            return True
    return False


@njit(inline="always")
def _find_in_shard(ds, sa, ptr_size, q, lo_byte, hi_byte, lo, hi, known):
    """The range [start, end) within ranks [lo, hi) of the suffixes that begin with q[lo_byte:hi_byte].
    All suffixes in [lo, hi) are known to share the first `known` bytes with the query."""
    m = hi_byte - lo_byte
    if m == 0:
        return lo, hi
    found, lo, mid, hi, llcp, rlcp = _any_match(ds, sa, ptr_size, q, lo_byte, hi_byte, lo, hi, known)
    if not found:
        return lo, lo
    # first match in [lo, mid]
    a, b, la, lb = lo, mid, llcp, m
    while a < b:
        md = (a + b) >> 1
        c, l = _compare(ds, _ptr(sa, ptr_size, md), q, lo_byte, hi_byte, min(la, lb))
        if c < 0:
            a = md + 1
            la = l
        else:
            b = md
            lb = l
    start = a
    # first suffix past the matches in [mid + 1, hi]
    a, b, la, lb = mid + 1, hi, m, rlcp
    while a < b:
        md = (a + b) >> 1
        c, l = _compare(ds, _ptr(sa, ptr_size, md), q, lo_byte, hi_byte, min(la, lb))
        if c <= 0:
            a = md + 1
            la = l
        else:
            b = md
            lb = l
    return start, a


# -- prefix buckets --------------------------------------------------------------------------------------
# Every suffix is at least one token long, so its first kb bytes exist (kb = 1 for u8 tokens, else 2), and
# the suffixes that start with one kb-byte key are a run of consecutive ranks. A shard's buckets are the
# first rank of every key's run: 65,537 int64 (512 KiB, 2 KiB for u8), small enough to stay in cache. A
# search over the whole shard starts in its query's bucket instead, skipping the first ~10 levels of the
# binary search (the entropy of the first token, in bits), each of which costs two cache misses.

def bucket_bytes(width: int) -> int:
    return 1 if width == 1 else 2


@njit(inline="always")
def _key_at(ds, p, kb):
    """The first kb bytes at byte p as a big-endian number (their order as bytes)."""
    if kb == 1:
        return np.int64(ds[p])
    return (np.int64(ds[p]) << 8) | np.int64(ds[p + 1])


@njit(nogil=True, cache=True)
def prefix_buckets(ds, sa, ptr_size, tok_cnt, kb):
    """buckets[key] = the first rank whose suffix's first kb bytes are >= key; buckets[256**kb] = tok_cnt.
    Found by galloping from the previous key's rank: O(keys * log(tok_cnt / keys)) reads, not a scan."""
    n_keys = 1 << (8 * kb)
    out = np.empty(n_keys + 1, np.int64)
    r = 0
    for k in range(n_keys):
        if r < tok_cnt and _key_at(ds, _ptr(sa, ptr_size, r), kb) < k:
            lo, step = r, 1          # key(lo) < k
            hi = lo + step
            while hi < tok_cnt and _key_at(ds, _ptr(sa, ptr_size, hi), kb) < k:
                lo = hi
                step <<= 1
                hi = lo + step
            hi = min(hi, tok_cnt)    # key(hi) >= k, or hi is the end
            while hi - lo > 1:
                mid = (lo + hi) >> 1
                if _key_at(ds, _ptr(sa, ptr_size, mid), kb) < k:
                    lo = mid
                else:
                    hi = mid
            r = hi
        out[k] = r
    out[n_keys] = tok_cnt
    return out


@njit(inline="always")
def _start_range(table, s, q, lo_byte, hi_byte, lo, hi, known):
    """(lo, hi, known) to search q[lo_byte:hi_byte] in shard s: a search over the whole shard is narrowed
    to the query's bucket, whose suffixes all share its first kb bytes; any other range is kept."""
    kb = table[s, BK_BYTES]
    if kb == 0 or known != 0 or lo != 0 or hi != table[s, TOK_CNT] or hi_byte - lo_byte < kb:
        return lo, hi, known
    key = _key_at(q, lo_byte, kb)
    buckets = _i64s_at(table[s, BK_ADDR], (1 << (8 * kb)) + 1)
    return buckets[key], buckets[key + 1], kb


@njit(inline="always")
def _find_all(table, q, lo_byte, hi_byte, seg, known, out):
    """Search every shard within the ranges `seg` (rows [start, end)); write the new ranges to `out`
    and return the total count."""
    total = 0
    for s in range(table.shape[0]):
        ds, sa, ps, n = _shard(table, s)
        lo, hi, kn = _start_range(table, s, q, lo_byte, hi_byte, seg[s, 0], seg[s, 1], known)
        a, b = _find_in_shard(ds, sa, ps, q, lo_byte, hi_byte, lo, hi, kn)
        out[s, 0] = a
        out[s, 1] = b
        total += b - a
    return total


@njit(inline="always")
def _full_ranges(table):
    seg = np.empty((table.shape[0], 2), np.int64)
    for s in range(table.shape[0]):
        seg[s, 0] = 0
        seg[s, 1] = table[s, TOK_CNT]
    return seg


# -- count, find, prob -----------------------------------------------------------------------------------

@njit(nogil=True, cache=True)
def find(table, q):
    """(count, ranges [n_shards, 2]) of the query bytes q over all shards."""
    seg = _full_ranges(table)
    out = np.empty_like(seg)
    cnt = _find_all(table, q, 0, q.shape[0], seg, 0, out)
    return cnt, out


@njit(nogil=True, cache=True)
def count(table, q):
    seg = _full_ranges(table)
    return _find_all(table, q, 0, q.shape[0], seg, 0, seg)


@njit(nogil=True, cache=True)
def count_many(table, q, offsets):
    """Counts of the queries q[offsets[i]:offsets[i+1]] (bytes), one call for all of them.

    A count is the difference of two plain binary searches in the query's bucket: the first suffix
    >= the query (lower) and the first suffix past its matches (upper). LOCKSTEP queries go together,
    2 * LOCKSTEP searches advanced one level per round: prefetch every live search's middle pointer, then
    the suffix bytes each points at, then compare. The cache misses of independent searches overlap
    instead of following one another, which is what bounds a single search."""
    n = offsets.shape[0] - 1
    out = np.zeros(n, np.int64)
    g = 2 * LOCKSTEP
    lo, hi = np.empty(g, np.int64), np.empty(g, np.int64)
    llcp, rlcp = np.empty(g, np.int64), np.empty(g, np.int64)
    ptr = np.empty(g, np.int64)
    for s in range(table.shape[0]):
        ds, sa, ps, tok_cnt = _shard(table, s)
        for i0 in range(0, n, LOCKSTEP):
            m = 2 * (min(n, i0 + LOCKSTEP) - i0)
            for j in range(m):
                i = i0 + (j >> 1)
                lo[j], hi[j], llcp[j] = _start_range(table, s, q, offsets[i], offsets[i + 1], 0, tok_cnt, 0)
                rlcp[j] = llcp[j]
            _lockstep_bounds(ds, sa, ps, q, offsets, i0, m, lo, hi, llcp, rlcp, ptr)
            for j in range(0, m, 2):
                out[i0 + (j >> 1)] += lo[j + 1] - lo[j]
    return out


@njit(inline="always")
def _lockstep_bounds(ds, sa, ps, q, offsets, i0, m, lo, hi, llcp, rlcp, ptr):
    """Run searches j < m to the end: search j is the lower (j even) or upper (j odd) bound of query
    i0 + j // 2 within [lo[j], hi[j]); each ends with lo[j] == hi[j] at its bound."""
    sa_addr, ds_addr = sa.ctypes.data, ds.ctypes.data
    live = m
    while live:
        for j in range(m):
            if lo[j] < hi[j]:
                _prefetch(sa_addr + ((lo[j] + hi[j]) >> 1) * ps)
        for j in range(m):
            if lo[j] < hi[j]:
                ptr[j] = _ptr(sa, ps, (lo[j] + hi[j]) >> 1)
                _prefetch(ds_addr + ptr[j] + min(llcp[j], rlcp[j]))
        live = 0
        for j in range(m):
            if lo[j] < hi[j]:
                i = i0 + (j >> 1)
                c, l = _compare(ds, ptr[j], q, offsets[i], offsets[i + 1], min(llcp[j], rlcp[j]))
                if c < 0 or (c == 0 and (j & 1)):
                    lo[j] = ((lo[j] + hi[j]) >> 1) + 1
                    llcp[j] = l
                else:
                    hi[j] = (lo[j] + hi[j]) >> 1
                    rlcp[j] = l
                if lo[j] < hi[j]:
                    live += 1


@njit(nogil=True, cache=True)
def prob(table, q, w):
    """(prompt_cnt, cont_cnt) for the query bytes q = prompt + one continuation token: the prompt's
    range is searched once and narrowed by the continuation (its suffixes share the prompt's bytes)."""
    seg = _full_ranges(table)
    d = q.shape[0] - w
    prompt_cnt = _find_all(table, q, 0, d, seg, 0, seg)
    if prompt_cnt == 0:
        return 0, 0
    cont_cnt = _find_all(table, q, 0, q.shape[0], seg, d, seg)
    return prompt_cnt, cont_cnt


# -- next-token distributions ----------------------------------------------------------------------------

@njit(inline="always")
def _support_unit(cnt, max_support):
    """infini-gram's sampling step: the smallest power of two `unit` with cnt <= unit * max_support."""
    unit = 1
    while cnt > unit * max_support:
        unit <<= 1
    return unit


@njit(nogil=True, cache=True)
def _ntd_ranges(table, seg, d, w, unit, eos, sep):
    """Next-token counts after a match of `d` bytes, over the ranges `seg`: (token ids ascending, counts).

    Mirrors infini-gram's `_get_freq_by_token_id_approx`: a segment whose first and last suffixes have
    the same next token is all that token (the range is sorted); a segment shorter than 4 * unit is
    read every `unit` ranks, each read standing for `unit` suffixes (exact when unit == 1); any other
    segment is halved. The end of the shard and the document separator count as `eos`. One deliberate
    difference: the same-token test compares the raw next tokens, so a segment that starts at the end of
    the shard and ends at a separator is not taken as all-eos (infini-gram maps both to eos first and
    would then count every suffix in between as eos)."""
    cap = 64
    toks = np.empty(cap, np.int64)
    cnts = np.empty(cap, np.int64)
    k = 0
    st = np.empty((256, 4), np.int64)   # stack of (start, end, first token, last token)
    for s in range(table.shape[0]):
        ds, sa, ps, n = _shard(table, s)
        if seg[s, 1] <= seg[s, 0]:
            continue
        top = 0
        st[0, 0], st[0, 1], st[0, 2], st[0, 3] = seg[s, 0], seg[s, 1], UNKNOWN, UNKNOWN
        top = 1
        while top > 0:
            top -= 1
            a, b, ta, tb = st[top, 0], st[top, 1], st[top, 2], st[top, 3]
            if b - a < 4 * unit:
                r = a
                while r < b:
                    if r + unit <= b:
                        mid, c = r + (unit >> 1), unit
                    else:
                        mid, c = (r + b) >> 1, b - r
                    if k == cap:
                        cap *= 2
                        toks = np.concatenate((toks, np.empty(cap - k, np.int64)))
                        cnts = np.concatenate((cnts, np.empty(cap - k, np.int64)))
                    toks[k] = _token_at(ds, _ptr(sa, ps, mid) + d, w)
                    cnts[k] = c
                    k += 1
                    r += unit
                continue
            if ta == UNKNOWN:
                ta = _token_at(ds, _ptr(sa, ps, a) + d, w)
            if tb == UNKNOWN:
                tb = _token_at(ds, _ptr(sa, ps, b - 1) + d, w)
            if ta == tb:
                if k == cap:
                    cap *= 2
                    toks = np.concatenate((toks, np.empty(cap - k, np.int64)))
                    cnts = np.concatenate((cnts, np.empty(cap - k, np.int64)))
                toks[k] = ta
                cnts[k] = b - a
                k += 1
                continue
            mi = (a + b) >> 1
            st[top, 0], st[top, 1], st[top, 2], st[top, 3] = mi, b, UNKNOWN, tb
            st[top + 1, 0], st[top + 1, 1], st[top + 1, 2], st[top + 1, 3] = a, mi, ta, UNKNOWN
            top += 2
    toks = toks[:k]
    cnts = cnts[:k]
    for i in range(k):
        if toks[i] == NO_TOKEN or toks[i] == sep:
            toks[i] = eos
    order = np.argsort(toks, kind="mergesort")
    out_t = np.empty(k, np.int64)
    out_c = np.empty(k, np.int64)
    u = -1
    for i in range(k):
        t = toks[order[i]]
        if u < 0 or out_t[u] != t:
            u += 1
            out_t[u] = t
            out_c[u] = 0
        out_c[u] += cnts[order[i]]
    return out_t[:u + 1], out_c[:u + 1]


@njit(nogil=True, cache=True)
def ntd(table, q, w, max_support, eos, sep):
    """(prompt_cnt, approx, token ids, counts) of the tokens following the prompt bytes q."""
    seg = _full_ranges(table)
    cnt = _find_all(table, q, 0, q.shape[0], seg, 0, seg)
    if cnt == 0:
        return 0, False, np.empty(0, np.int64), np.empty(0, np.int64)
    unit = _support_unit(cnt, max_support)
    toks, cnts = _ntd_ranges(table, seg, q.shape[0], w, unit, eos, sep)
    return cnt, unit > 1, toks, cnts


# -- infini-gram (longest matching suffix) ---------------------------------------------------------------

@njit(inline="always")
def _longest_suffix(table, q, end_byte, w, seg):
    """The largest L such that the last L tokens of q[:end_byte] occur (all of it when L = its length),
    found as infini-gram does: doubling, then binary search, but each probe only asks whether the suffix
    occurs (_occurs); the ranges are found once, for L. Leaves that suffix's ranges in seg."""
    n_tok = end_byte // w
    full = _full_ranges(table)
    lo, hi = 0, 1
    while True:
        if hi > n_tok:
            hi = n_tok + 1
            break
        if not _occurs(table, q, end_byte - hi * w, end_byte):
            break
        lo = hi
        hi <<= 1
    while hi - lo > 1:
        mid = (lo + hi) >> 1
        if not _occurs(table, q, end_byte - mid * w, end_byte):
            hi = mid
        else:
            lo = mid
    _find_all(table, q, end_byte - lo * w, end_byte, full, 0, seg)
    return lo


@njit(nogil=True, cache=True)
def infgram_prob(table, q, w):
    """(suffix_len, prompt_cnt, cont_cnt) for q = prompt + one continuation token."""
    seg = np.empty((table.shape[0], 2), np.int64)
    d = q.shape[0] - w
    L = _longest_suffix(table, q, d, w, seg)
    prompt_cnt = 0
    for s in range(table.shape[0]):
        prompt_cnt += seg[s, 1] - seg[s, 0]
    cont_cnt = _find_all(table, q, d - L * w, q.shape[0], seg, L * w, seg)
    return L, prompt_cnt, cont_cnt


@njit(nogil=True, cache=True)
def infgram_ntd(table, q, w, max_support, eos, sep):
    """(suffix_len, prompt_cnt, approx, token ids, counts) for the prompt bytes q."""
    seg = np.empty((table.shape[0], 2), np.int64)
    L = _longest_suffix(table, q, q.shape[0], w, seg)
    cnt = 0
    for s in range(table.shape[0]):
        cnt += seg[s, 1] - seg[s, 0]
    unit = _support_unit(cnt, max_support)
    toks, cnts = _ntd_ranges(table, seg, L * w, w, unit, eos, sep)
    return L, cnt, unit > 1, toks, cnts


@njit(nogil=True, cache=True)
def score_sequence(table, q, w):
    """For every token i of the sequence q: the longest suffix of q[:i] that occurs (its length, count)
    and the count of that suffix followed by token i; the ∞-gram probability is their ratio.

    One left-to-right pass. With s the start of the longest occurring suffix of q[:i] and its ranges,
    token i only narrows those ranges (a search of one more token within them). When the narrowed count
    is 0 the start moves right, one token at a time, and the shorter pattern q[s:i+1] is searched afresh;
    the start never moves left, so there are at most n fresh searches in all, each as long as a match
    in the corpus (not the context): the cost per token does not grow with the context length."""
    n = q.shape[0] // w
    suffix_len = np.empty(n, np.int64)
    prompt_cnt = np.empty(n, np.int64)
    cont_cnt = np.empty(n, np.int64)
    full = _full_ranges(table)
    total = 0
    for s in range(table.shape[0]):
        total += full[s, 1]
    seg = full.copy()
    nxt = np.empty_like(seg)
    cnt = total
    start = 0
    for i in range(n):
        ncnt = _find_all(table, q, start * w, (i + 1) * w, seg, (i - start) * w, nxt)
        suffix_len[i] = i - start
        prompt_cnt[i] = cnt
        cont_cnt[i] = ncnt
        while ncnt == 0:
            start += 1
            if start == i + 1:
                nxt[:] = full
                ncnt = total
            else:
                ncnt = _find_all(table, q, start * w, (i + 1) * w, full, 0, nxt)
        seg[:] = nxt
        cnt = ncnt
    return suffix_len, prompt_cnt, cont_cnt


# -- CNF queries ---------------------------------------------------------------------------------------
# infini-gram subsamples a clause whose matches in a shard exceed max_clause_freq / n_shards, with a
# std::mt19937 seeded 19260817 and std::uniform_int_distribution<uint64_t> (libstdc++ 10, the version its
# wheel was built with). Both are reimplemented here draw for draw, so approximate CNF counts match too.

@njit(inline="always")
def _mt_seed(seed):
    mt = np.empty(625, np.int64)   # 624 words of state, then the index of the next word
    mt[0] = seed & 0xFFFFFFFF
    for i in range(1, 624):
        mt[i] = (1812433253 * (mt[i - 1] ^ (mt[i - 1] >> 30)) + i) & 0xFFFFFFFF
    mt[624] = 624
    return mt


@njit(inline="always")
def _mt_next(mt):
    if mt[624] >= 624:
        for i in range(624):
            y = (mt[i] & 0x80000000) | (mt[(i + 1) % 624] & 0x7FFFFFFF)
            v = mt[(i + 397) % 624] ^ (y >> 1)
            if y & 1:
                v ^= 0x9908B0DF
            mt[i] = v
        mt[624] = 0
    y = mt[mt[624]]
    mt[624] += 1
    y ^= y >> 11
    y ^= (y << 7) & 0x9D2C5680
    y ^= (y << 15) & 0xEFC60000
    y ^= y >> 18
    return y & 0xFFFFFFFF


@njit(inline="always")
def _uniform_below_2_32(mt, urange):
    """libstdc++ 10's downscaling: a uniform integer in [0, urange] for urange < 2**32 - 1."""
    uerange = urange + 1
    scaling = 0xFFFFFFFF // uerange
    past = uerange * scaling
    r = _mt_next(mt)
    while r >= past:
        r = _mt_next(mt)
    return r // scaling


@njit(inline="always")
def _uniform(mt, a, b):
    """std::uniform_int_distribution<uint64_t>(a, b)(mt19937), as libstdc++ 10 computes it."""
    urange = b - a
    if urange < 0xFFFFFFFF:
        return a + _uniform_below_2_32(mt, urange)
    if urange == 0xFFFFFFFF:
        return a + _mt_next(mt)
    while True:   # upscaling: ranges of 2**32 values or more
        hi_part = urange >> 32
        if hi_part < 0xFFFFFFFF:
            tmp = (1 << 32) * _uniform_below_2_32(mt, hi_part)
        else:
            tmp = (1 << 32) * _mt_next(mt)
        r = tmp + _mt_next(mt)
        if not (r > urange or r < tmp):
            return a + r


@njit(inline="always")
def _ptrs_of(table, s, seg, t0, t1):
    """The byte pointers of the matches of terms t0..t1-1 in shard s (term order, then rank order)."""
    ds, sa, ps, n = _shard(table, s)
    total = 0
    for t in range(t0, t1):
        total += seg[t, s, 1] - seg[t, s, 0]
    out = np.empty(total, np.int64)
    k = 0
    for t in range(t0, t1):
        for r in range(seg[t, s, 0], seg[t, s, 1]):
            out[k] = _ptr(sa, ps, r)
            k += 1
    return out


RADIX_BITS = 11
COVER_BITS = 1 << 17
SMALL_SORT = 64


@njit(inline="always")
def _radix_sort(x, bound):
    """x (int64 values in [0, bound)) sorted ascending, in O(len(x)) per 11 bits of bound: LSD radix
    sort (x is reused as scratch). Clause pointers are bounded by the shard's size, so three passes sort
    a 2^33-byte shard's worth; a comparison sort would spend log2(len(x)) passes."""
    n = x.shape[0]
    if n <= SMALL_SORT:
        return np.sort(x)
    radix = 1 << RADIX_BITS
    buf = np.empty_like(x)
    cnt = np.empty(radix + 1, np.int64)
    shift = 0
    while shift == 0 or (bound - 1) >> shift:
        cnt[:] = 0
        for i in range(n):
            cnt[((x[i] >> shift) & (radix - 1)) + 1] += 1
        for dgt in range(radix):
            cnt[dgt + 1] += cnt[dgt]
        for i in range(n):
            dgt = (x[i] >> shift) & (radix - 1)
            buf[cnt[dgt]] = x[i]
            cnt[dgt] += 1
        x, buf = buf, x
        shift += RADIX_BITS
    return x


@njit(inline="always")
def _directory(ptrs, bound):
    """(cells, shift) over sorted values in [0, bound): cells[c] = the first index i with
    ptrs[i] >> shift >= c, with about one value per cell, so a lookup needs no binary search."""
    m = ptrs.shape[0]
    shift = 0
    while (bound >> shift) > max(m, 1):
        shift += 1
    n_cells = (bound >> shift) + 1
    cells = np.empty(n_cells + 1, np.int64)
    i = 0
    for c in range(n_cells + 1):
        while i < m and (ptrs[i] >> shift) < c:
            i += 1
        cells[c] = i
    return cells, shift


@njit(inline="always")
def _first_at_least(ptrs, cells, shift, v):
    """np.searchsorted(ptrs, v) (the first index with ptrs[i] >= v) through the directory."""
    i = cells[min(v >> shift, cells.shape[0] - 1)]
    while i < ptrs.shape[0] and ptrs[i] < v:
        i += 1
    return i


# Merging a clause into the candidates (ranges [l, r] of byte offsets, one per partial match), as
# infini-gram does: with `lo` the clause's last match < r and `hi` its first match >= l, a candidate
# extends to the left when lo >= l - span and to the right when hi <= r + span (both: one candidate
# spanning both; either: one candidate each). Only matches within [l - span, r + span] can count, so
# each of the two ways below returns, per candidate, near_l = lo when it qualifies (else -1) and near_r =
# hi when it qualifies (else -1). Both give the same answers; the caller picks the one that sorts fewer.

@njit(inline="always")
def _nearest_by_sorting_matches(table, s, seg, t0, t1, ls, rs, span, ds_size):
    """Radix-sort the clause's matches, then look each candidate's neighbours up (directory, no search)."""
    ptrs = _radix_sort(_ptrs_of(table, s, seg, t0, t1), ds_size)
    cells, shift = _directory(ptrs, ds_size)
    n = ls.shape[0]
    near_l = np.full(n, -1, np.int64)
    near_r = np.full(n, -1, np.int64)
    for i in range(n):
        lo = _first_at_least(ptrs, cells, shift, rs[i]) - 1
        hi = _first_at_least(ptrs, cells, shift, ls[i])
        if lo >= 0 and ptrs[lo] >= ls[i] - span:
            near_l[i] = ptrs[lo]
        if hi < ptrs.shape[0] and ptrs[hi] <= rs[i] + span:
            near_r[i] = ptrs[hi]
    return near_l, near_r


@njit(inline="always")
def _nearest_by_indexing_candidates(table, s, seg, t0, t1, ls, rs, span, ds_size):
    """Group the candidates by position (a counting sort into cells of about one candidate each), then
    stream the clause's matches straight from the suffix array, each updating the few candidates whose
    window [l - span, r + span] holds it: the largest match in [l - span, r), the smallest in [l, r + span].
    A match that no window covers (most of them) costs one read of a bitmap that stays in L1."""
    n = ls.shape[0]
    shift = 0
    while (ds_size >> shift) > max(n, 1):
        shift += 1
    n_cells = (ds_size >> shift) + 1
    start = np.zeros(n_cells + 1, np.int64)
    widest = 0
    for i in range(n):
        start[(ls[i] >> shift) + 1] += 1
        widest = max(widest, rs[i] - ls[i])
    for c in range(n_cells):
        start[c + 1] += start[c]
    fill = start[:-1].copy()
    by_cell = np.empty(n, np.int64)
    for i in range(n):
        c = ls[i] >> shift
        by_cell[fill[c]] = i
        fill[c] += 1
    fine = 0   # a bitmap of the bytes some candidate's window covers, in at most 2^17 bits (fits in L1)
    while (ds_size >> fine) > COVER_BITS:
        fine += 1
    covered = np.zeros(((ds_size >> fine) >> 6) + 1, np.uint64)
    for i in range(n):
        for c in range(max(0, ls[i] - span) >> fine, (min(ds_size - 1, rs[i] + span) >> fine) + 1):
            covered[c >> 6] |= np.uint64(1) << np.uint64(c & 63)
    near_l = np.full(n, -1, np.int64)
    near_r = np.full(n, -1, np.int64)
    ds, sa, ps, tok_cnt = _shard(table, s)
    for t in range(t0, t1):
        for rank in range(seg[t, s, 0], seg[t, s, 1]):
            p = _ptr(sa, ps, rank)
            b = p >> fine
            if not (covered[b >> 6] >> np.uint64(b & 63)) & np.uint64(1):
                continue
            c_lo = max(0, p - span - widest) >> shift   # l >= p - span - (r - l) for r + span >= p
            c_hi = min(n_cells - 1, (p + span) >> shift)  # l - span <= p
            for c in range(c_lo, c_hi + 1):
                for k in range(start[c], start[c + 1]):
                    i = by_cell[k]
                    l, r = ls[i], rs[i]
                    if l - span <= p < r and p > near_l[i]:
                        near_l[i] = p
                    if l <= p <= r + span and (near_r[i] < 0 or p < near_r[i]):
                        near_r[i] = p
    return near_l, near_r


@njit(nogil=True, cache=True)
def find_cnf(table, q, term_off, clause_off, w, sep, max_clause_freq, max_diff_tokens):
    """A CNF query: clause c is the OR of terms clause_off[c]..clause_off[c+1]-1; term t is the query
    bytes q[term_off[t]:term_off[t+1]]. Returns (count, approx, pointers, pointer offsets by shard): a
    match is a set of term occurrences, one per clause, within max_diff_tokens of each other and in one
    document; its pointer is that of its first occurrence. infini-gram's algorithm, step for step."""
    S = table.shape[0]
    T = term_off.shape[0] - 1
    C = clause_off.shape[0] - 1
    full = _full_ranges(table)
    seg = np.empty((T, S, 2), np.int64)
    for t in range(T):
        _find_all(table, q, term_off[t], term_off[t + 1], full, 0, seg[t])
    cnt_cs = np.zeros((C, S), np.int64)
    for c in range(C):
        total = 0
        for t in range(clause_off[c], clause_off[c + 1]):
            for s in range(S):
                cnt_cs[c, s] += seg[t, s, 1] - seg[t, s, 0]
        for s in range(S):
            total += cnt_cs[c, s]
        if total == 0:
            return 0, False, np.empty(0, np.int64), np.zeros(0, np.int64)   # no offsets: a clause is empty
    # subsample clauses with too many matches in a shard (each (clause, shard) with a fresh generator)
    per_shard = (max_clause_freq + S - 1) // S
    factor = np.ones((C, S), np.float64)
    for c in range(C):
        for s in range(S):
            cnt = cnt_cs[c, s]
            if cnt <= per_shard:
                continue
            mt = _mt_seed(CNF_SEED)
            new_cnt = 0
            for t in range(clause_off[c], clause_off[c + 1]):
                length = seg[t, s, 1] - seg[t, s, 0]
                new_length = (length * per_shard + (cnt - 1)) // cnt
                new_start = seg[t, s, 0] + _uniform(mt, 0, length - new_length)
                seg[t, s, 0] = new_start
                seg[t, s, 1] = new_start + new_length
                new_cnt += new_length
            factor[c, s] = np.float64(cnt // new_cnt)   # integer division, as in infini-gram
    # per shard: intersect the clauses, the rarest first
    span = max_diff_tokens * w
    total_cnt = 0
    approx = False
    ptr_off = np.zeros(S + 1, np.int64)
    ptr_chunks = []
    for s in range(S):
        order = np.argsort(cnt_cs[:, s], kind="mergesort")
        c0 = order[0]
        ls = _ptrs_of(table, s, seg, clause_off[c0], clause_off[c0 + 1])
        rs = ls.copy()
        f = factor[c0, s]
        ds_size = table[s, DS_SIZE]
        for j in range(1, C):
            c = order[j]
            t0, t1 = clause_off[c], clause_off[c + 1]
            m = 0
            for t in range(t0, t1):
                m += seg[t, s, 1] - seg[t, s, 0]
            if ls.shape[0] <= m:   # index the fewer: the candidates, and stream the clause's matches past them
                near_l, near_r = _nearest_by_indexing_candidates(table, s, seg, t0, t1, ls, rs, span, ds_size)
            else:                  # or sort the clause's matches and look each candidate up
                near_l, near_r = _nearest_by_sorting_matches(table, s, seg, t0, t1, ls, rs, span, ds_size)
            new_ls = np.empty(2 * ls.shape[0], np.int64)
            new_rs = np.empty(2 * ls.shape[0], np.int64)
            k = 0
            for i in range(ls.shape[0]):
                l, r = ls[i], rs[i]
                if near_l[i] >= 0 and near_r[i] >= 0:
                    new_ls[k], new_rs[k] = min(l, near_l[i]), max(r, near_r[i])
                    k += 1
                else:
                    if near_l[i] >= 0:
                        new_ls[k], new_rs[k] = min(l, near_l[i]), r
                        k += 1
                    if near_r[i] >= 0:
                        new_ls[k], new_rs[k] = l, max(r, near_r[i])
                        k += 1
            ls, rs = new_ls[:k], new_rs[:k]
            f *= factor[c, s]
        # drop matches that cross a document boundary
        ds, sa, ps, n = _shard(table, s)
        keep = np.empty(ls.shape[0], np.int64)
        k = 0
        for i in range(ls.shape[0]):
            ok = True
            for p in range(ls[i], rs[i], w):
                if _token_at(ds, p, w) == sep:
                    ok = False
                    break
            if ok:
                keep[k] = ls[i]
                k += 1
        ptr_chunks.append(keep[:k])
        ptr_off[s + 1] = ptr_off[s] + k
        total_cnt += np.int64(k * f)
        if f != 1.0:
            approx = True
    ptrs_all = np.empty(ptr_off[S], np.int64)
    for s in range(S):
        ptrs_all[ptr_off[s]:ptr_off[s + 1]] = ptr_chunks[s]
    return total_cnt, approx, ptrs_all, ptr_off


# -- documents -----------------------------------------------------------------------------------------

@njit(inline="always")
def _u64_at(address, i):
    b = _bytes_at(address + 8 * i, 8)
    v = 0
    for k in range(8):
        v |= np.int64(b[k]) << (8 * k)
    return v


@njit(inline="always")
def _doc_start(table, s, i):
    """Byte offset of document i's separator in shard s (the shard's size for i == doc count)."""
    if i >= table[s, DOC_CNT]:
        return table[s, DS_SIZE]
    return _u64_at(table[s, OD_ADDR], i)


@njit(inline="always")
def _meta_start(table, s, i):
    if i >= table[s, DOC_CNT]:
        return table[s, MT_SIZE]
    return _u64_at(table[s, OM_ADDR], i)


@njit(nogil=True, cache=True)
def locate_doc(table, s, ptr, w, before, after):
    """The document of shard s holding byte `ptr`, and a display window of up to `before` tokens
    before ptr and `after` from it: (doc_ix, doc_len, disp_start, disp_end, needle_offset, meta_start,
    meta_end), byte offsets into the shard's tokenized/metadata files."""
    lo, hi = 0, table[s, DOC_CNT]
    while hi - lo > 1:
        mi = (lo + hi) >> 1
        if _doc_start(table, s, mi) <= ptr:
            lo = mi
        else:
            hi = mi
    doc_ix = lo
    for t in range(s):
        doc_ix += table[t, DOC_CNT]
    start = _doc_start(table, s, lo) + w    # skip the separator
    end = _doc_start(table, s, lo + 1)
    disp_start = max(start, ptr - w * before)
    disp_end = min(end, ptr + w * after)
    meta_a, meta_b = 0, 0
    if table[s, MT_ADDR] != 0:
        meta_a, meta_b = _meta_start(table, s, lo), _meta_start(table, s, lo + 1)
    return doc_ix, (end - start) // w, disp_start, disp_end, (ptr - disp_start) // w, meta_a, meta_b


@njit(nogil=True, cache=True)
def doc_window(table, s, local_ix, w, max_disp_len):
    """(doc_len, disp_start, disp_end, meta_start, meta_end) of document local_ix of shard s."""
    start = _doc_start(table, s, local_ix) + w
    end = _doc_start(table, s, local_ix + 1)
    meta_a, meta_b = 0, 0
    if table[s, MT_ADDR] != 0:
        meta_a, meta_b = _meta_start(table, s, local_ix), _meta_start(table, s, local_ix + 1)
    return (end - start) // w, start, min(end, start + w * max_disp_len), meta_a, meta_b


@njit(nogil=True, cache=True)
def rank_to_ptr(table, s, rank):
    ds, sa, ps, n = _shard(table, s)
    return _ptr(sa, ps, rank)


@njit(nogil=True, cache=True)
def match_pointers(table, seg, idxs):
    """(shard, byte pointer) of each match idxs[i], matches numbered as infini-gram does: shard by shard,
    in suffix-array order within a shard (seg: each shard's rank range)."""
    n = idxs.shape[0]
    shards = np.empty(n, np.int64)
    ptrs = np.empty(n, np.int64)
    for d in range(n):
        idx = idxs[d]
        s = 0
        while idx >= seg[s, 1] - seg[s, 0]:
            idx -= seg[s, 1] - seg[s, 0]
            s += 1
        shards[d] = s
        ds, sa, ps, _ = _shard(table, s)
        ptrs[d] = _ptr(sa, ps, seg[s, 0] + idx)
    return shards, ptrs


# -- building ------------------------------------------------------------------------------------------

@njit(nogil=True, cache=True)
def keep_aligned(sa, w):
    """Compact, in place, the byte suffix array to the suffixes that start on a token boundary;
    returns how many there are."""
    k = 0
    for i in range(sa.shape[0]):
        if sa[i] % w == 0:
            sa[k] = sa[i]
            k += 1
    return k


@njit(nogil=True, cache=True)
def pack_pointers(sa, ptr_size, out):
    """Little-endian ptr_size-byte pointers of sa into out (uint8, len(sa) * ptr_size)."""
    for i in range(sa.shape[0]):
        v = np.int64(sa[i])
        for k in range(ptr_size):
            out[i * ptr_size + k] = (v >> (8 * k)) & 0xFF
