"""Attention over the paged KV cache for a packed batch of sequences, and the batch's metadata.

A step's N new tokens are the new tokens of B sequences concatenated (some prefilling a chunk, some decoding
one token): each attends to its own cached prefix and, causally, to its own new tokens (or under a tree
mask, for verifying speculative candidates). The forward writes the new tokens' K/V into the cache first,
so attention reads every key from the cache.

Backends:
- "sdpa": torch scaled_dot_product_attention per sequence over its gathered K/V; the CPU path and the
  reference the others are tested against.
- "triton" (CUDA; the interpreter on CPU): decoding sequences (one new token) -> flash_decode on the paged
  cache (HiP sparse decode past `sparse_decode_from` keys); prefill chunks -> flash_prefill varlen over each
  sequence's gathered prefix + chunk (HiP sparse prefill past `sparse_prefill_from` keys); tree-masked
  sequences -> the SDPA routine (the kernels take no mask).
flash_decode's split counters are per device: keep decode steps on one CUDA stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .kv_cache import CacheFull, KVCache

BACKENDS = ("sdpa", "triton")


@dataclass
class AttentionBatch:
    """Metadata of one packed step. Device tensors are what a captured CUDA graph reads (static buffers);
    the host lists are there for eager steps (None in a captured decode step)."""

    cu_seqlens: torch.Tensor          # int32 [B + 1]: offsets of each sequence's new tokens in the packed N
    seqlens: torch.Tensor             # int32 [B]: each sequence's cached length after this step (new included)
    block_table: torch.Tensor         # int32 [B, max_pages]: each sequence's pages
    slot_mapping: torch.Tensor        # int64 [N]: flat cache slot of each new token
    max_seqlen_q: int                 # host upper bound of new tokens per sequence
    max_seqlen_k: int                 # host upper bound of seqlens (no device sync; fixed in a CUDA graph)
    q_lens: list[int] | None = None   # host copies of the new-token counts and of seqlens
    kv_lens: list[int] | None = None
    tree_mask: list[torch.Tensor | None] | None = None  # per sequence bool [n_new, n_new], True = visible
    seqs: list | None = None          # the cache's sequence ids, in order
    sparse_decode: bool | None = None  # force HiP decode on/off for every decoding row (None: by length)
    # a captured prefill of one fresh sequence (graphs.PrefillGraphs): its keys are its new tokens, read back
    # from these slots [N] after the write (padding rows read any valid slot; cu_seqlens hides them)
    kv_read_slots: torch.Tensor | None = None
    _memo: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def n_seqs(self) -> int:
        return self.seqlens.shape[0]

    @property
    def decode_only(self) -> bool:
        """Every sequence decodes one token without a tree mask."""
        return self.max_seqlen_q == 1 and not (self.tree_mask and any(m is not None for m in self.tree_mask))

    def host(self) -> tuple[list[int], list[int]]:
        if self.q_lens is None or self.kv_lens is None:
            raise RuntimeError("this step has no host-side lengths (a captured decode step): "
                               "only the decode path can run it")
        return self.q_lens, self.kv_lens

    def kv_slots(self, rows: Sequence[int], page_size: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Flat cache slots of the full K/V (prefix + new) of the given rows, concatenated: int64 [sum L],
        their offsets cu_seqlens_k int32 [len(rows) + 1], and the host offsets. Computed once per step."""
        key = ("kv_slots", tuple(rows), page_size)
        if key not in self._memo:
            _, kv_lens = self.host()
            dev = self.block_table.device
            lens = [kv_lens[r] for r in rows]
            cu = [0]
            for n in lens:
                cu.append(cu[-1] + n)
            lens_t = torch.tensor(lens, dtype=torch.int64, device=dev)
            cu_t = torch.tensor(cu, dtype=torch.int64, device=dev)
            which = torch.repeat_interleave(torch.arange(len(rows), device=dev), lens_t, output_size=cu[-1])
            t = torch.arange(cu[-1], device=dev) - cu_t[which]           # token index within its sequence
            table = self.block_table[torch.tensor(list(rows), dtype=torch.int64, device=dev)].long()
            slots = table[which, t // page_size] * page_size + t % page_size
            self._memo[key] = (slots, cu_t.to(torch.int32), cu)
        return self._memo[key]


def prepare_step(cache: KVCache, seqs: Sequence, n_new: Sequence[int],
                 tree_masks: Sequence[torch.Tensor | None] | None = None,
                 positions: torch.Tensor | None = None, max_pages: int | None = None):
    """Grow each sequence by n_new[i] tokens (pages allocated, lengths advanced) and describe the step.

    All or nothing: raises CacheFull (naming the first sequence that does not fit) before anything changes.
    positions: the new tokens' RoPE positions [N] (default: their cache index, start .. start + n - 1).
    Returns (AttentionBatch, positions int64 [N] on the cache's device).
    """
    seqs, n_new = list(seqs), [int(n) for n in n_new]
    if len(seqs) != len(n_new):
        raise ValueError(f"{len(seqs)} sequences but {len(n_new)} token counts")
    if len(set(seqs)) != len(seqs):
        raise ValueError("a sequence appears twice in one step")
    if any(n <= 0 for n in n_new):
        raise ValueError(f"every sequence of a step needs at least one new token, got {n_new}")
    if tree_masks is not None:
        if len(tree_masks) != len(seqs):
            raise ValueError(f"{len(tree_masks)} tree masks for {len(seqs)} sequences")
        for s, n, m in zip(seqs, n_new, tree_masks):
            if m is None:
                continue
            if m.dtype != torch.bool or tuple(m.shape) != (n, n):
                raise ValueError(f"tree_mask of sequence {s!r}: expected bool [{n}, {n}], got {m.dtype} "
                                 f"{list(m.shape)}")
            if not bool(m.diagonal().all()):
                raise ValueError(f"tree_mask of sequence {s!r}: every token must see itself (diagonal True)")
    need = 0
    for s, n in zip(seqs, n_new):
        need += cache.pages_needed(s, n)
        if need > cache.free_pages:
            raise CacheFull(s, need, cache.free_pages, cache.num_pages)
    starts = []
    for s, n in zip(seqs, n_new):
        cache.allocate(s, n)
        starts.append(cache.advance(s, n))
    kv_lens = [a + n for a, n in zip(starts, n_new)]
    dev = cache.device
    cu = [0]
    for n in n_new:
        cu.append(cu[-1] + n)
    if positions is None:
        positions = torch.cat([torch.arange(a, a + n, dtype=torch.int64) for a, n in zip(starts, n_new)])
    elif positions.shape != (cu[-1],):
        raise ValueError(f"positions: expected [{cu[-1]}], got {list(positions.shape)}")
    batch = AttentionBatch(
        cu_seqlens=torch.tensor(cu, dtype=torch.int32).to(dev),
        seqlens=torch.tensor(kv_lens, dtype=torch.int32).to(dev),
        block_table=cache.block_table(seqs, max_pages),
        slot_mapping=cache.slot_mapping(seqs, starts, n_new),
        max_seqlen_q=max(n_new), max_seqlen_k=max(kv_lens), q_lens=n_new, kv_lens=kv_lens,
        tree_mask=[None if m is None else m.to(dev) for m in tree_masks] if tree_masks is not None else None,
        seqs=seqs)
    return batch, positions.to(dev)


# ---- SDPA (reference, CPU) --------------------------------------------------------------------------------

def _visible(n_new: int, n_kv: int, tree: torch.Tensor | None, device) -> torch.Tensor | None:
    """bool [n_new, n_kv]: the prefix is visible to every new token; among the new ones, causal or the tree.
    None when plain causal with no prefix or a single token (SDPA's own is_causal / no mask)."""
    prefix = n_kv - n_new
    if tree is None and (n_new == 1):
        return None
    keep = torch.ones(n_new, n_kv, dtype=torch.bool, device=device)
    if tree is None:
        keep[:, prefix:] = torch.ones(n_new, n_new, dtype=torch.bool, device=device).tril()
    else:
        keep[:, prefix:] = tree
    return keep


# Up to this many new tokens a sequence's attention is plain matmuls: torch's CPU flash kernel costs
# milliseconds a call whatever the size (measured 6 ms for one query over 40 keys, 30 layers a token).
SMALL_Q = 8


def attend_small(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                 scale: float | None) -> torch.Tensor:
    """q [n, HQ, D] over k, v [L, HKV, D] (query head h reads KV head h // G), mask bool [n, L] or None:
    o [n, HQ, D], softmax in float32."""
    n, HQ, D = q.shape
    HKV = k.shape[1]
    G = HQ // HKV
    scale = D ** -0.5 if scale is None else scale
    qg = q.reshape(n, HKV, G, D).permute(1, 0, 2, 3).reshape(HKV, n * G, D)   # [HKV, n*G, D], row = i*G + g
    s = (qg @ k.permute(1, 2, 0)).float() * scale                             # [HKV, n*G, L]
    if mask is not None:
        s = s.masked_fill(~mask.repeat_interleave(G, dim=0), float("-inf"))
    o = s.softmax(dim=-1).to(v.dtype) @ v.transpose(0, 1)                      # [HKV, n*G, D]
    return o.reshape(HKV, n, G, D).permute(1, 0, 2, 3).reshape(n, HQ, D)


def sdpa_rows(q: torch.Tensor, layer: int, batch: AttentionBatch, cache: KVCache, rows: Sequence[int],
              scale: float | None, out: torch.Tensor) -> None:
    """Attention of the given rows' new tokens by torch SDPA, into out [N, HQ, D]."""
    if not rows:
        return
    q_lens, kv_lens = batch.host()
    slots, _, cu_k = batch.kv_slots(rows, cache.page_size)
    k_all, v_all = cache.read(layer, slots)  # [sum L, HKV, D]
    G = q.shape[1] // k_all.shape[1]
    q_off = [0]
    for n in q_lens:
        q_off.append(q_off[-1] + n)
    for j, r in enumerate(rows):
        a, b = q_off[r], q_off[r + 1]
        k, v = k_all[cu_k[j]:cu_k[j + 1]].to(q.dtype), v_all[cu_k[j]:cu_k[j + 1]].to(q.dtype)   # [L, HKV, D]
        tree = batch.tree_mask[r] if batch.tree_mask is not None else None
        mask = _visible(b - a, kv_lens[r], tree, q.device)
        if b - a <= SMALL_Q:
            out[a:b] = attend_small(q[a:b], k, v, mask, scale)
            continue
        qi = q[a:b].transpose(0, 1)[None]                                      # [1, HQ, n, D]
        ki = k.transpose(0, 1).repeat_interleave(G, 0)[None]                   # [1, HQ, L, D]
        vi = v.transpose(0, 1).repeat_interleave(G, 0)[None]
        oi = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale)
        out[a:b] = oi[0].transpose(0, 1)


def sdpa_attention(q: torch.Tensor, layer: int, batch: AttentionBatch, cache: KVCache,
                   scale: float | None = None) -> torch.Tensor:
    """q [N, HQ, D] -> o [N, HQ, D]."""
    out = torch.empty_like(q)
    sdpa_rows(q, layer, batch, cache, range(batch.n_seqs), scale, out)
    return out


# ---- Triton (CUDA) ----------------------------------------------------------------------------------------

def _hip_defaults() -> dict:
    from ..kernels.hf import HIP_DEFAULTS

    return dict(HIP_DEFAULTS)


@dataclass
class TritonOptions:
    """When the sparse kernels take over. 8192 keys is the switch of the kernels' transformers integration
    (kernels.hf HIP_DEFAULTS dense_below): below it the estimate/selection does not pay for itself
    (BENCHMARKS: HiP pays at 32k-128k); not re-measured inside this decoder."""

    sparse_decode: bool = True
    sparse_decode_from: int = 8192
    sparse_prefill: bool = True
    sparse_prefill_from: int = 8192
    hip: dict = field(default_factory=_hip_defaults)  # HiP parameters (block sizes, topk, top_p, ...)


def _plan(batch: AttentionBatch, opts: TritonOptions) -> dict:
    """Which rows go where (host-side, once per step)."""
    key = ("plan", id(opts))
    if key in batch._memo:
        return batch._memo[key]
    q_lens, kv_lens = batch.host()
    tree = batch.tree_mask or [None] * len(q_lens)
    dev = batch.seqlens.device
    dec, dec_sparse, pre, pre_sparse, masked = [], [], [], [], []
    for r, (n, L) in enumerate(zip(q_lens, kv_lens)):
        if tree[r] is not None:
            masked.append(r)
        elif n == 1:
            sparse = batch.sparse_decode if batch.sparse_decode is not None else (
                opts.sparse_decode and L >= opts.sparse_decode_from)
            (dec_sparse if sparse else dec).append(r)
        elif opts.sparse_prefill and L >= opts.sparse_prefill_from:
            pre_sparse.append(r)
        else:
            pre.append(r)
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    n_all = len(q_lens)
    plan = {"dec": dec, "dec_sparse": dec_sparse, "pre": pre, "pre_sparse": pre_sparse, "masked": masked,
            "starts": starts}
    # index tensors only for groups that are a strict subset of the rows (built once per step, used by every layer)
    for name in ("dec", "dec_sparse", "pre"):
        rows = plan[name]
        if rows and len(rows) < n_all:
            plan[name + "_rows"] = torch.tensor(rows, dtype=torch.int64, device=dev)
            plan[name + "_tok"] = torch.tensor([t for r in rows for t in range(starts[r], starts[r + 1])],
                                               dtype=torch.int64, device=dev)
    if pre:
        plan["pre_cu_q"] = torch.tensor([0, *_cumsum(q_lens[r] for r in pre)], dtype=torch.int32, device=dev)
        plan["pre_max_q"] = max(q_lens[r] for r in pre)
    batch._memo[key] = plan
    return plan


def _cumsum(xs):
    s = 0
    for x in xs:
        s += x
        yield s


def _decode(q, layer, cache, seqlens, block_table, max_seqlen, sparse, scale, opts):
    """q [B, 1, HQ, D] over the paged cache -> [B, 1, HQ, D]."""
    from ..kernels.flash_decode import flash_decode
    from ..kernels.hip_attention import hip_decode, hip_decode_select

    k, v = cache.k[layer], cache.v[layer]  # [num_pages, page_size, HKV, D]
    if not sparse:
        return flash_decode(q, k, v, seqlens=seqlens, block_table=block_table, max_seqlen=max_seqlen, scale=scale)
    h = opts.hip
    if cache.page_size % h["block_size_k"]:
        raise ValueError(f"HiP decode needs the page size ({cache.page_size}) to be a multiple of its key block "
                         f"({h['block_size_k']})")
    # selection every step (stateless; the transformers integration refreshes it every few steps instead)
    sel = hip_decode_select(q, k, seqlens, max_seqlen, block_size_k=h["block_size_k"], topk=h["topk"],
                            n_sink=h["n_sink"], n_local=h["n_local"], n_rep=h["n_rep"], block_table=block_table)
    return hip_decode(q, k, v, sel, seqlens=seqlens, block_table=block_table, block_size_k=h["block_size_k"],
                      n_sink=h["n_sink"], n_local=h["n_local"], scale=scale)


def triton_attention(q: torch.Tensor, layer: int, batch: AttentionBatch, cache: KVCache,
                     scale: float | None = None, opts: TritonOptions | None = None) -> torch.Tensor:
    """q [N, HQ, D] -> o [N, HQ, D] through the Triton kernels (see the module docstring)."""
    from ..kernels.flash_prefill import flash_prefill
    from ..kernels.hip_attention import hip_attention_prefill

    opts = opts or TritonOptions()
    N, HQ, D = q.shape
    if batch.decode_only and (batch.q_lens is None or batch.sparse_decode is not None):
        # a (captured) decode step: static shapes, no host lengths
        sparse = bool(batch.sparse_decode)
        o = _decode(q.view(N, 1, HQ, D), layer, cache, batch.seqlens, batch.block_table, batch.max_seqlen_k,
                    sparse, scale, opts)
        return o.view(N, HQ, D)
    if batch.kv_read_slots is not None:
        # a captured prefill (static shapes, no host lengths): one sequence, no cached prefix
        k, v = cache.read(layer, batch.kv_read_slots)  # [N, HKV, D]
        return flash_prefill(q[None], k[None], v[None], causal=True, scale=scale, cu_seqlens=batch.cu_seqlens,
                             cu_seqlens_k=batch.cu_seqlens, max_seqlen_q=batch.max_seqlen_q)[0]
    plan = _plan(batch, opts)
    out = torch.empty_like(q)
    for name, sparse in (("dec", False), ("dec_sparse", True)):
        rows = plan[name]
        if not rows:
            continue
        if len(rows) == batch.n_seqs:  # all rows: no gathers
            o = _decode(q.view(N, 1, HQ, D), layer, cache, batch.seqlens, batch.block_table, batch.max_seqlen_k,
                        sparse, scale, opts)
            return o.view(N, HQ, D)
        idx, tok = plan[name + "_rows"], plan[name + "_tok"]
        o = _decode(q[tok][:, None], layer, cache, batch.seqlens[idx], batch.block_table[idx],
                    max(batch.kv_lens[r] for r in rows), sparse, scale, opts)
        out[tok] = o[:, 0]
    if plan["pre"]:
        slots, cu_k, _ = batch.kv_slots(plan["pre"], cache.page_size)
        k, v = cache.read(layer, slots)  # [sum L, HKV, D]
        whole = len(plan["pre"]) == batch.n_seqs
        qp = q if whole else q[plan["pre_tok"]]
        # flash_prefill's causal mask is bottom-right aligned (query i of T_q sees keys j <= i + T_k - T_q):
        # the chunk is the last T_q of the sequence's T_k keys
        o = flash_prefill(qp[None], k[None], v[None], causal=True, scale=scale, cu_seqlens=plan["pre_cu_q"],
                          cu_seqlens_k=cu_k, max_seqlen_q=plan["pre_max_q"])[0]
        if whole:
            return o
        out[plan["pre_tok"]] = o
    if plan["pre_sparse"]:
        h = {k: v for k, v in opts.hip.items() if k != "refresh_every"}
        h["dense_below"] = opts.sparse_prefill_from
        starts = plan["starts"]
        for r in plan["pre_sparse"]:
            slots, _, _ = batch.kv_slots([r], cache.page_size)
            k, v = cache.read(layer, slots)
            a, b = starts[r], starts[r + 1]
            out[a:b] = hip_attention_prefill(q[a:b][None], k[None], v[None], causal=True, scale=scale, **h)[0]
    sdpa_rows(q, layer, batch, cache, plan["masked"], scale, out)
    return out


def attend(q: torch.Tensor, layer: int, batch: AttentionBatch, cache: KVCache, backend: str = "sdpa",
           scale: float | None = None, opts: TritonOptions | None = None) -> torch.Tensor:
    if backend == "sdpa":
        return sdpa_attention(q, layer, batch, cache, scale)
    if backend == "triton":
        return triton_attention(q, layer, batch, cache, scale, opts)
    raise ValueError(f"attention backend {backend!r}: expected one of {', '.join(BACKENDS)}")
