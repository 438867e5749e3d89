"""A paged KV cache (vLLM's layout per layer, which is flash_decode's paged layout): K and V pools of
fixed-size pages, a free list, and per sequence a block table (its pages in order) and a length.

Sequences are any hashable id chosen by the caller (the scheduler's request ids). Host-side bookkeeping
only: nothing here synchronises with the device."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from .config import ModelConfig


class CacheFull(RuntimeError):
    """Not enough free pages for an allocation (nothing was allocated). The scheduler catches it and
    preempts or waits."""

    def __init__(self, seq, needed: int, free: int, num_pages: int):
        self.seq, self.needed, self.free, self.num_pages = seq, needed, free, num_pages
        super().__init__(f"KV cache full: sequence {seq!r} needs {needed} more pages, {free} of {num_pages} free")


def page_bytes(config: ModelConfig, page_size: int, dtype: torch.dtype) -> int:
    """Bytes of one page across all layers, K and V."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * config.n_layers * page_size * config.n_kv_heads * config.head_dim * elem


def pages_for_budget(config: ModelConfig, budget_bytes: int, page_size: int = 64,
                     dtype: torch.dtype = torch.bfloat16) -> int:
    """The number of pages whose K and V pools fit in budget_bytes."""
    if page_size <= 0:
        raise ValueError(f"page_size must be positive, got {page_size}")
    return max(0, int(budget_bytes) // page_bytes(config, page_size, dtype))


class KVCache:
    """k, v: [n_layers, num_pages, page_size, n_kv_heads, head_dim]; cache[layer] is flash_decode's
    [num_pages, page_size, HKV, D] paged cache. A token's slot is page * page_size + offset: its row in the
    flattened [num_pages * page_size, HKV, D] view of one layer."""

    def __init__(self, config: ModelConfig, num_pages: int, page_size: int = 64, dtype: torch.dtype | None = None,
                 device: torch.device | str = "cpu"):
        if num_pages <= 0:
            raise ValueError(f"num_pages must be positive, got {num_pages}")
        if page_size <= 0:
            raise ValueError(f"page_size must be positive, got {page_size}")
        self.config = config
        self.num_pages = int(num_pages)
        self.page_size = int(page_size)
        self.device = torch.device(device)
        self.dtype = dtype or torch.float32
        shape = (config.n_layers, self.num_pages, self.page_size, config.n_kv_heads, config.head_dim)
        self.k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        # a stack: the pages freed last are reused first (still warm in L2)
        self._free: list[int] = list(range(self.num_pages - 1, -1, -1))
        self.pages: dict[Hashable, list[int]] = {}
        self.lengths: dict[Hashable, int] = {}

    @classmethod
    def for_budget(cls, config: ModelConfig, budget_bytes: int, page_size: int = 64,
                   dtype: torch.dtype = torch.bfloat16, device="cpu") -> "KVCache":
        n = pages_for_budget(config, budget_bytes, page_size, dtype)
        if n == 0:
            raise ValueError(f"a KV cache budget of {budget_bytes} bytes holds no page of "
                             f"{page_bytes(config, page_size, dtype)} bytes")
        return cls(config, n, page_size, dtype, device)

    # ---- allocation -------------------------------------------------------------------------------------
    @property
    def free_pages(self) -> int:
        return len(self._free)

    def capacity(self, seq) -> int:
        """Tokens the sequence's pages hold."""
        return len(self.pages.get(seq, ())) * self.page_size

    def length(self, seq) -> int:
        return self.lengths.get(seq, 0)

    def pages_needed(self, seq, n_tokens: int) -> int:
        """More pages the sequence needs to hold n_tokens tokens beyond its length."""
        want = self.length(seq) + n_tokens
        return max(0, -(-want // self.page_size) - len(self.pages.get(seq, ())))

    def allocate(self, seq, n_tokens: int) -> None:
        """Room for n_tokens more tokens after the sequence's length (all or nothing: raises CacheFull and
        allocates nothing when the free pages do not suffice). A new id starts an empty sequence."""
        if n_tokens < 0:
            raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
        need = self.pages_needed(seq, n_tokens)
        if need > len(self._free):
            raise CacheFull(seq, need, len(self._free), self.num_pages)
        pages = self.pages.setdefault(seq, [])
        self.lengths.setdefault(seq, 0)
        for _ in range(need):
            pages.append(self._free.pop())

    def advance(self, seq, n_tokens: int) -> int:
        """Count n_tokens more tokens as cached (their pages allocated); returns the old length."""
        start = self.length(seq)
        if start + n_tokens > self.capacity(seq):
            raise ValueError(f"sequence {seq!r}: {start + n_tokens} tokens exceed its {self.capacity(seq)} "
                             "allocated slots (allocate first)")
        self.lengths[seq] = start + n_tokens
        return start

    def truncate(self, seq, length: int) -> None:
        """Keep the first `length` tokens (speculative tokens rejected); whole pages past them go back."""
        if not 0 <= length <= self.length(seq):
            raise ValueError(f"sequence {seq!r}: cannot truncate {self.length(seq)} tokens to {length}")
        self.lengths[seq] = length
        pages = self.pages[seq]
        keep = -(-length // self.page_size)
        self._free.extend(reversed(pages[keep:]))
        del pages[keep:]

    def free(self, seq) -> None:
        """Return the sequence's pages (usable by the next allocation) and forget it."""
        pages = self.pages.pop(seq, None)
        self.lengths.pop(seq, None)
        if pages:
            self._free.extend(reversed(pages))

    # ---- addressing -------------------------------------------------------------------------------------
    def block_table(self, seqs: Sequence, max_pages: int | None = None, device=None) -> torch.Tensor:
        """int32 [len(seqs), max_pages]: each sequence's pages in order, padded with page 0 (never read: the
        kernels stop at each sequence's length)."""
        rows = [self.pages.get(s, []) for s in seqs]
        width = max([len(r) for r in rows], default=0) if max_pages is None else max_pages
        width = max(width, 1)
        table = torch.zeros(len(rows), width, dtype=torch.int32)
        for i, r in enumerate(rows):
            if len(r) > width:
                raise ValueError(f"sequence {seqs[i]!r} has {len(r)} pages, more than max_pages {width}")
            table[i, : len(r)] = torch.tensor(r, dtype=torch.int32)
        return table.to(device or self.device)

    def slots(self, seq, start: int, n: int) -> torch.Tensor:
        """Flat slots of the sequence's tokens start .. start + n - 1: int64 [n] on the CPU."""
        pages, ps = self.pages.get(seq, []), self.page_size
        if start < 0 or start + n > len(pages) * ps:
            raise ValueError(f"sequence {seq!r}: tokens {start}..{start + n} outside its allocated {len(pages) * ps}")
        t = torch.arange(start, start + n, dtype=torch.int64)
        return torch.tensor(pages, dtype=torch.int64)[t // ps] * ps + t % ps if n else t

    def slot_mapping(self, seqs: Sequence, starts: Sequence[int], counts: Sequence[int], device=None) -> torch.Tensor:
        """int64 [sum(counts)]: the slots of each sequence's tokens starts[i] .. starts[i] + counts[i] - 1,
        concatenated (where a step's new K/V go)."""
        parts = [self.slots(s, a, n) for s, a, n in zip(seqs, starts, counts)]
        out = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
        return out.to(device or self.device)

    # ---- data -------------------------------------------------------------------------------------------
    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [n, HKV, D] into the given flat slots [n] of one layer (the forward's new tokens; also
        precomputed chunk K/V placed into a sequence's pages)."""
        kf = self.k[layer].view(-1, *self.k.shape[-2:])  # [num_pages * page_size, HKV, D]
        vf = self.v[layer].view(-1, *self.v.shape[-2:])
        kf.index_copy_(0, slots, k.to(self.dtype))
        vf.index_copy_(0, slots, v.to(self.dtype))

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [n, HKV, D] at flat slots [n] of one layer (a gather: contiguous copies)."""
        kf = self.k[layer].view(-1, *self.k.shape[-2:])
        vf = self.v[layer].view(-1, *self.v.shape[-2:])
        return kf.index_select(0, slots), vf.index_select(0, slots)

    def gather(self, layer: int, seq) -> tuple[torch.Tensor, torch.Tensor]:
        """The sequence's cached K, V [length, HKV, D] in token order."""
        return self.read(layer, self.slots(seq, 0, self.length(seq)).to(self.device))

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2
