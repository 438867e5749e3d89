"""Generation for one sequence (batch 1) on the packed-batch forward: prefill, decode steps, a generator of
token ids, and on CUDA a CUDA-graph decode step (gpt-fast). The scheduler (continuous batching) drives
`Transformer.forward` with `prepare_step` itself; these are the batch-1 building blocks and the reference
it is tested against.

sample_fn(logits [B, V] float32) -> token ids [B] int64; `greedy` here, the samplers in retro/sampling.py.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator

import torch

from .attention import AttentionBatch, prepare_step
from .graphs import CapturedGraphs, PrefillGraphs
from .kv_cache import KVCache
from .model import Transformer

SampleFn = Callable[[torch.Tensor], torch.Tensor]
DEFAULT_PREFILL_CHUNK = 4096


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> argmax ids [B] (ties: the lowest id, as torch.argmax and transformers)."""
    return logits.argmax(dim=-1)


def set_cpu_threads(n: int | None = None) -> int:
    """Intra-op threads for CPU inference: n, else the cores this process may run on (torch's default counts
    the host's cores, too many in a CPU-limited container). Returns the number set."""
    if n is None:
        try:
            n = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            n = os.cpu_count() or 1
    n = max(1, int(n))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def _as_tokens(tokens, device) -> torch.Tensor:
    t = torch.as_tensor(tokens, dtype=torch.int64)
    if t.dim() != 1:
        raise ValueError(f"tokens: expected a 1-D sequence of ids, got shape {list(t.shape)}")
    return t.to(device)


@torch.inference_mode()
def prefill(model: Transformer, cache: KVCache, seq, tokens, chunk_size: int | None = DEFAULT_PREFILL_CHUNK) -> torch.Tensor:
    """Append tokens to the sequence's cache (in chunks of chunk_size) and return the logits [V] after the last."""
    toks = _as_tokens(tokens, model.device)
    if toks.numel() == 0:
        raise ValueError("prefill: no tokens")
    step = chunk_size or toks.numel()
    logits = None
    for a in range(0, toks.numel(), step):
        chunk = toks[a:a + step]
        batch, pos = prepare_step(cache, [seq], [chunk.numel()])
        last = torch.tensor([chunk.numel() - 1], device=model.device)
        logits = model(chunk, pos, batch, cache, logits_at=last)
    return logits[0]


@torch.inference_mode()
def decode_one_token(model: Transformer, cache: KVCache, seq, token) -> torch.Tensor:
    """Append one token and return the logits [V] after it."""
    tok = _as_tokens([token] if not torch.is_tensor(token) else token.reshape(1), model.device)
    batch, pos = prepare_step(cache, [seq], [1])
    return model(tok, pos, batch, cache)[0]


class CUDAGraphDecoder:
    """The batch-1 decode step with static shapes: token, position, length, slot and block table live in fixed
    buffers, the block table has room for max_seqlen tokens, and flash_decode gets max_seqlen as its bound
    (no host sync). On CUDA the step is captured once per attention variant (dense / HiP past
    TritonOptions.sparse_decode_from) and replayed; elsewhere the same static step runs eagerly.

    The host keeps the cache's bookkeeping (pages, length): step() allocates, fills the buffers, replays.
    """

    def __init__(self, model: Transformer, cache: KVCache, seq, max_seqlen: int):
        self.model, self.cache, self.seq = model, cache, seq
        self.max_seqlen = int(max_seqlen)
        self.max_pages = math.ceil(self.max_seqlen / cache.page_size)
        self.cuda = model.device.type == "cuda"
        if self.cuda and model.attn_backend != "triton":
            raise ValueError("CUDA graph decoding needs the triton attention backend (model.set_backend('triton'))")
        dev = model.device
        self.tokens = torch.zeros(1, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(1, dtype=torch.int64, device=dev)
        self.batch = AttentionBatch(
            cu_seqlens=torch.tensor([0, 1], dtype=torch.int32, device=dev),
            seqlens=torch.zeros(1, dtype=torch.int32, device=dev),
            block_table=torch.zeros(1, self.max_pages, dtype=torch.int32, device=dev),
            slot_mapping=torch.zeros(1, dtype=torch.int64, device=dev),
            max_seqlen_q=1, max_seqlen_k=self.max_seqlen, seqs=[seq])
        self._pages_in_table = 0
        self._graphs = CapturedGraphs()   # dense / HiP

    def restart(self, seq) -> "CUDAGraphDecoder":
        """Decode another sequence of the same cache with the graphs already captured."""
        self.seq, self.batch.seqs, self._pages_in_table = seq, [seq], 0
        return self

    def _sparse(self, length: int) -> bool:
        opts = self.model.attn_options
        if self.model.attn_backend != "triton":
            return False
        if opts is None:
            from .attention import TritonOptions

            opts = self.model.attn_options = TritonOptions()
        return bool(opts.sparse_decode and length >= opts.sparse_decode_from)

    def _forward(self) -> torch.Tensor:
        return self.model(self.tokens, self.positions, self.batch, self.cache)  # [1, V]

    @torch.inference_mode()
    def step(self, token) -> torch.Tensor:
        """Append token (int or a device tensor of one id) and return the logits [V] after it. The returned
        tensor is a static buffer on CUDA: read it before the next step."""
        cache, seq = self.cache, self.seq
        length = cache.length(seq)
        if length + 1 > self.max_seqlen:
            raise ValueError(f"CUDAGraphDecoder: sequence {seq!r} would exceed its max_seqlen {self.max_seqlen}")
        cache.allocate(seq, 1)
        cache.advance(seq, 1)
        pages = cache.pages[seq]
        for i in range(self._pages_in_table, len(pages)):
            self.batch.block_table[0, i].fill_(pages[i])
        self._pages_in_table = len(pages)
        ps = cache.page_size
        if torch.is_tensor(token):
            self.tokens.copy_(token.reshape(1))
        else:
            self.tokens.fill_(int(token))
        self.positions.fill_(length)
        self.batch.seqlens.fill_(length + 1)
        self.batch.slot_mapping.fill_(pages[length // ps] * ps + length % ps)
        sparse = self._sparse(length + 1)
        self.batch.sparse_decode = sparse
        if self.cuda:
            return self._graphs.replay(sparse, self._forward)[0]
        if self.model.attn_backend != "triton":
            # the SDPA path reads host lengths; the Triton path runs exactly what a graph would capture
            self.batch.q_lens, self.batch.kv_lens = [1], [length + 1]
            self.batch._memo.clear()
        return self._forward()[0]


class _TokenReader:
    """The sampled token on its way to the host. On CUDA the copy goes to pinned memory behind an event, so the
    host can queue the next forward (which reads the token on the device) before it waits (`ahead`); the
    sampler still runs after the host has seen every earlier token (stateful samplers see the history)."""

    def __init__(self, device: torch.device):
        self.ahead = device.type == "cuda"
        self.tok: torch.Tensor | None = None
        if self.ahead:
            self.host = torch.empty((), dtype=torch.int64, pin_memory=True)
            self.event = torch.cuda.Event()

    def send(self, tok: torch.Tensor) -> None:
        self.tok = tok
        if self.ahead:
            self.host.copy_(tok, non_blocking=True)
            self.event.record()

    def read(self) -> int:
        if self.ahead:
            self.event.synchronize()
            return int(self.host)
        return int(self.tok)


class _GraphRunner:
    """What batch-1 generation on CUDA keeps between calls (gpt-fast's static cache): a KV cache for max_seqlen
    tokens and the graphs captured over it, the prefill's and the decode step's. Capturing costs tens of
    milliseconds, which a call of a few hundred tokens would otherwise pay every time."""

    def __init__(self, model: Transformer, max_seqlen: int, page_size: int):
        self.max_seqlen, self.page_size = max_seqlen, page_size
        self.key = _backend_key(model)
        self.cache = model.new_cache(math.ceil(max_seqlen / page_size), page_size)
        self.prefill = PrefillGraphs(model, self.cache, min(max_seqlen, 4096))
        self.decoder = CUDAGraphDecoder(model, self.cache, None, max_seqlen)
        self.busy = False


def _backend_key(model: Transformer) -> tuple:
    """What the captured graphs baked in: a runner made under another backend setting is stale."""
    return model.attn_backend, model.layers[0].attention.fused, model.layers[0].matvec_rows, id(model.attn_options)


def _graph_runner(model: Transformer, total: int, page_size: int) -> _GraphRunner | None:
    """The model's runner if it fits total tokens and is free (None while another generate holds it: that one
    gets a cache of its own); a bigger one replaces it."""
    runner = getattr(model, "_graph_runner", None)
    if runner is not None and runner.busy:
        return None
    if runner is None or runner.max_seqlen < total or runner.page_size != page_size \
            or runner.key != _backend_key(model):
        runner = model._graph_runner = _GraphRunner(model, max(2048, 1 << (total - 1).bit_length()), page_size)
    return runner


def generate(model: Transformer, tokenizer, prompt_ids: Iterable[int], max_new_tokens: int,
             sample_fn: SampleFn = greedy, stop_token_ids: Iterable[int] | None = None, *,
             cache: KVCache | None = None, seq=0, prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
             cuda_graph: bool | None = None, page_size: int = 64) -> Iterator[int]:
    """Yield up to max_new_tokens ids continuing prompt_ids (a stop token is yielded, then generation ends).

    stop_token_ids: default the model's eos ids and the tokenizer's eos. cache: a KVCache to use (the sequence
    `seq` stays in it afterwards); default a fresh one sized for prompt + max_new_tokens, freed at the end.
    cuda_graph: capture the prefill of a fresh prompt and the decode step (default: on CUDA with the triton
    backend); without a cache given, the graphs and their cache are kept on the model for the next call.
    """
    prompt = _as_tokens(list(prompt_ids), model.device)
    if prompt.numel() == 0:
        raise ValueError("generate: prompt_ids is empty (at least one token, e.g. BOS, is needed)")
    if max_new_tokens <= 0:
        return
    stops = set(model.config.eos_token_ids if stop_token_ids is None else stop_token_ids)
    if stop_token_ids is None and getattr(tokenizer, "eos_token_id", None) is not None:
        stops.add(int(tokenizer.eos_token_id))
    total = prompt.numel() + max_new_tokens
    if model.device.type == "cpu":
        set_cpu_threads()
    if cuda_graph is None:
        cuda_graph = model.device.type == "cuda" and model.attn_backend == "triton"
    own_cache = cache is None
    runner = _graph_runner(model, total, page_size) if own_cache and cuda_graph and model.device.type == "cuda" \
        else None
    if runner is not None:
        runner.busy = True
        cache = runner.cache
    elif own_cache:
        cache = model.new_cache(math.ceil(total / page_size), page_size)
    logits = None   # a forward's logits not sampled yet (run ahead: its token is past what was yielded)
    try:
        if runner is not None and runner.prefill.fits(cache, seq, prompt.numel()):
            first = runner.prefill.prefill(seq, prompt)
        else:
            first = prefill(model, cache, seq, prompt, prefill_chunk)
        if runner is not None:
            step = runner.decoder.restart(seq).step
        elif cuda_graph:
            step = CUDAGraphDecoder(model, cache, seq, cache.length(seq) + max_new_tokens).step
        else:
            def step(tok):
                return decode_one_token(model, cache, seq, tok)
        reader = _TokenReader(model.device)
        reader.send(sample_fn(first[None])[0])
        for i in range(max_new_tokens):
            last = i == max_new_tokens - 1
            # queue the next forward before waiting for this token: the GPU runs it while the host streams
            logits = step(reader.tok) if reader.ahead and not last else None
            t = reader.read()
            yield t
            if t in stops or last:
                return
            if logits is None:
                logits = step(reader.tok)
            reader.send(sample_fn(logits[None])[0])
            logits = None
    finally:
        if own_cache:
            cache.free(seq)
            if runner is not None:
                runner.busy = False
        elif logits is not None:
            cache.truncate(seq, cache.length(seq) - 1)   # a step run ahead past the end: drop its token
