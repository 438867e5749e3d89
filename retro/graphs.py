"""CUDA graphs for the scheduler's decode-only steps (continuous batching), gpt-fast / vLLM style, and for the
prefill of a fresh prompt (PrefillGraphs, below).

A decode step of B sequences is one token each. Its inputs live in static buffers sized for `max_batch`
rows; a graph is captured per batch-size bucket (1, 2, 4, 8, ... up to max_batch) on the first step of
that size and replayed afterwards. A step of B rows runs the bucket >= B: the padding rows decode a dummy
token into a scratch page that no sequence owns (allocated once, at construction), with length 1, so they
cost a little work and touch nothing real. flash_decode gets the context bound as its host-side max_seqlen,
so the grid never depends on the step.

Off CUDA the same static step runs eagerly (the tests exercise the buffers, padding and scratch page on
the CPU). Steps that need HiP sparse decode (a sequence past the sparse threshold) are not captured: the
scheduler runs them eagerly.
"""

from __future__ import annotations

import math

import torch

from .attention import AttentionBatch
from .kv_cache import KVCache
from .model import Transformer

SCRATCH = ("__decode_graph_scratch__",)


def capture(forward, pool=None):
    """(graph, static output, pool): `forward` warmed up on a side stream (Triton compiles there), then
    captured as a CUDA graph in the memory pool `pool` (a new one when None). The warm-up runs compute the
    very step being captured (same inputs, same cache slots), so they change nothing."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            forward()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    pool = pool if pool is not None else torch.cuda.graph_pool_handle()
    with torch.cuda.graph(g, pool=pool):
        out = forward()
    return g, out, pool


class CapturedGraphs:
    """CUDA graphs captured once per key (a batch bucket, a prompt bucket, dense or sparse) in one memory pool,
    replayed after; each replay returns its graph's static output."""

    def __init__(self):
        self._graphs: dict = {}
        self._pool = None

    def __iter__(self):
        return iter(self._graphs)

    def replay(self, key, forward) -> torch.Tensor:
        if key not in self._graphs:
            g, out, self._pool = capture(forward, self._pool)
            self._graphs[key] = (g, out)
        graph, out = self._graphs[key]
        graph.replay()
        return out


def buckets(max_batch: int) -> list[int]:
    """1, 2, 4, ... and max_batch itself."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


class DecodeGraphs:
    def __init__(self, model: Transformer, cache: KVCache, max_batch: int, max_seqlen: int):
        self.model, self.cache = model, cache
        self.max_batch, self.max_seqlen = int(max_batch), int(max_seqlen)
        self.max_pages = math.ceil(self.max_seqlen / cache.page_size)
        self.cuda = model.device.type == "cuda"
        self.buckets = buckets(self.max_batch)
        cache.allocate(SCRATCH, 1)   # one page for the padding rows' K/V
        cache.advance(SCRATCH, 1)
        self.scratch_page = cache.pages[SCRATCH][0]
        dev, B = model.device, self.max_batch
        self.tokens = torch.zeros(B, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(B, dtype=torch.int64, device=dev)
        self.seqlens = torch.ones(B, dtype=torch.int32, device=dev)
        self.block_table = torch.full((B, self.max_pages), self.scratch_page, dtype=torch.int32, device=dev)
        self.slot_mapping = torch.full((B,), self.scratch_page * cache.page_size, dtype=torch.int64, device=dev)
        self.cu_seqlens = torch.arange(B + 1, dtype=torch.int32, device=dev)
        self._graphs = CapturedGraphs()

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def fits(self, cache: KVCache, seqs) -> bool:
        """Whether this decode step can run here: few enough rows, lengths within the bound, dense attention."""
        if len(seqs) > self.max_batch or cache is not self.cache:
            return False
        longest = max(cache.length(s) for s in seqs) + 1
        opts = self.model.attn_options
        sparse = self.model.attn_backend == "triton" and opts is not None and opts.sparse_decode \
            and longest >= opts.sparse_decode_from
        return longest <= self.max_seqlen and not sparse

    def _batch(self, B: int, kv_lens: list[int] | None = None) -> AttentionBatch:
        # host lengths only for an eager step (the SDPA path reads them; a captured step must not)
        return AttentionBatch(cu_seqlens=self.cu_seqlens[:B + 1], seqlens=self.seqlens[:B],
                              block_table=self.block_table[:B], slot_mapping=self.slot_mapping[:B],
                              max_seqlen_q=1, max_seqlen_k=self.max_seqlen, sparse_decode=False,
                              q_lens=[1] * B if kv_lens else None, kv_lens=kv_lens)

    def _forward(self, B: int, kv_lens: list[int] | None = None) -> torch.Tensor:
        return self.model(self.tokens[:B], self.positions[:B], self._batch(B, kv_lens), self.cache)   # [B, V]

    @torch.inference_mode()
    def step(self, seqs: list, tokens: list[int]) -> torch.Tensor:
        """Append one token to each sequence; logits [len(seqs), V] (a view of a static buffer on CUDA:
        read it before the next step)."""
        n = len(seqs)
        B = self.bucket(n)
        cache, ps = self.cache, self.cache.page_size
        table = torch.full((B, self.max_pages), self.scratch_page, dtype=torch.int32)
        positions, seqlens, slots = [0] * B, [1] * B, [self.scratch_page * ps] * B
        for i, s in enumerate(seqs):
            cache.allocate(s, 1)
            length = cache.advance(s, 1)
            pages = cache.pages[s]
            table[i, :len(pages)] = torch.tensor(pages, dtype=torch.int32)
            positions[i], seqlens[i] = length, length + 1
            slots[i] = pages[length // ps] * ps + length % ps
        dev = self.tokens.device
        self.tokens[:B].copy_(torch.tensor(tokens + [0] * (B - n), dtype=torch.int64), non_blocking=True)
        self.positions[:B].copy_(torch.tensor(positions, dtype=torch.int64), non_blocking=True)
        self.seqlens[:B].copy_(torch.tensor(seqlens, dtype=torch.int32), non_blocking=True)
        self.slot_mapping[:B].copy_(torch.tensor(slots, dtype=torch.int64), non_blocking=True)
        self.block_table[:B].copy_(table.to(dev), non_blocking=True)
        if self.cuda:
            return self._graphs.replay(B, lambda: self._forward(B))[:n]
        return self._forward(B, seqlens)[:n]


class PrefillGraphs:
    """A fresh sequence's prompt (no cached prefix) as one captured forward: eagerly, a prefill launches a few
    hundred kernels from Python and the host, not the GPU, sets the time to first token.

    Prompts are padded to a bucket (multiples of 64 to 512, then powers of two); a graph is captured per bucket
    on first use. The padding tokens write no K/V (slot -1: rope_cache_write skips them) and attend to nothing
    (cu_seqlens ends at the real length), so their rows are garbage that only the padding reads. Needs the
    triton backend with the fused layer ops (the skip is the kernel's). Off CUDA the same static forward runs
    eagerly (the tests)."""

    def __init__(self, model: Transformer, cache: KVCache, max_tokens: int = 2048):
        self.model, self.cache = model, cache
        self.cuda = model.device.type == "cuda"
        self.buckets = [b for b in (*range(64, 513, 64), 1024, 2048, 4096) if b < max_tokens] + [max_tokens]
        M, dev = max_tokens, model.device
        self.tokens = torch.zeros(M, dtype=torch.int64, device=dev)
        self.positions = torch.arange(M, dtype=torch.int64, device=dev)   # a fresh sequence starts at 0
        self.slots = torch.full((M,), -1, dtype=torch.int64, device=dev)
        self.read_slots = torch.zeros(M, dtype=torch.int64, device=dev)
        self.cu_seqlens = torch.zeros(2, dtype=torch.int32, device=dev)
        self.seqlens = torch.zeros(1, dtype=torch.int32, device=dev)
        self.last = torch.zeros(1, dtype=torch.int64, device=dev)
        self.block_table = torch.zeros(1, 1, dtype=torch.int32, device=dev)   # unread by the captured path
        self._graphs = CapturedGraphs()

    def fits(self, cache: KVCache, seq, n: int) -> bool:
        m = self.model
        opts = m.attn_options
        sparse = opts is not None and opts.sparse_prefill and n >= opts.sparse_prefill_from
        return (cache is self.cache and cache.length(seq) == 0 and 0 < n <= self.buckets[-1] and not sparse
                and m.attn_backend == "triton" and m.layers[0].attention.fused)

    def _forward(self, B: int) -> torch.Tensor:
        batch = AttentionBatch(cu_seqlens=self.cu_seqlens, seqlens=self.seqlens, block_table=self.block_table,
                               slot_mapping=self.slots[:B], max_seqlen_q=B, max_seqlen_k=B,
                               kv_read_slots=self.read_slots[:B])
        return self.model(self.tokens[:B], self.positions[:B], batch, self.cache, logits_at=self.last)  # [1, V]

    @torch.inference_mode()
    def prefill(self, seq, tokens: torch.Tensor) -> torch.Tensor:
        """Append tokens [n] (on the model's device) to the empty sequence `seq`; the logits [V] after the last
        (a static buffer on CUDA: read it before the next prefill)."""
        n = tokens.numel()
        if not self.fits(self.cache, seq, n):
            raise ValueError(f"PrefillGraphs: sequence {seq!r} with {n} tokens does not fit (fresh sequences of up "
                             f"to {self.buckets[-1]} tokens, triton backend with fused layer ops)")
        B = next(b for b in self.buckets if b >= n)
        cache = self.cache
        cache.allocate(seq, n)
        cache.advance(seq, n)
        slots = cache.slot_mapping([seq], [0], [n])            # int64 [n] on the device
        self.tokens[:n].copy_(tokens)
        self.slots[:n].copy_(slots)
        self.slots[n:B].fill_(-1)
        self.read_slots[:n].copy_(slots)
        self.cu_seqlens[1:].fill_(n)
        self.seqlens.fill_(n)
        self.last.fill_(n - 1)
        if not self.cuda:
            return self._forward(B)[0]
        return self._graphs.replay(B, lambda: self._forward(B))[0]
