"""What the decoder tests share: tiny random transformers models (the reference) and our model on the same
weights, and a driver that runs several sequences through packed steps."""

from __future__ import annotations

import torch

from retrogram.retro.attention import prepare_step
from retrogram.retro.config import ModelConfig
from retrogram.retro.model import Transformer
from retrogram.retro.rope import Rotary
from retrogram.retro.weights import build_model, convert_hf_state_dict


def hf_model(cfg: ModelConfig, seed: int = 0):
    """A transformers model of this config with random weights large enough to make every part matter."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hfc = AutoConfig.for_model(**cfg.to_hf())
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hfc, attn_implementation="eager", dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return model.requires_grad_(False)


def ours_from_hf(hf, backend: str = "sdpa", dtype=torch.float32):
    cfg = ModelConfig.from_hf(hf.config.to_dict())
    return build_model(cfg, convert_hf_state_dict(cfg, hf.state_dict()), "cpu", dtype, backend)


def hf_logits(hf, ids) -> torch.Tensor:
    """[T, V] logits of one full sequence."""
    with torch.no_grad():
        return hf(torch.as_tensor(ids)[None]).logits[0].float()


def random_model(cfg: ModelConfig, device="cpu", dtype=torch.float32, seed: int = 0, scale: float = 0.15,
                 norm_scale: float = 0.2) -> Transformer:
    """Our Transformer with random weights (norm weights around 1), RoPE frequencies kept in float32."""
    g = torch.Generator().manual_seed(seed)
    m = Transformer(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(1 + norm_scale * torch.randn(p.shape, generator=g) if name.endswith("norm.weight")
                    else scale * torch.randn(p.shape, generator=g))
    m = m.to(device, dtype).eval().requires_grad_(False)
    m.rope = Rotary(cfg).to(device)
    return m


def run_schedule(model, cache, seqs: dict, schedule):
    """seqs: id -> full token list; schedule: list of steps, each a list of (id, n_new). Returns
    id -> logits [T_done, V] for every token fed, in order."""
    done = {s: 0 for s in seqs}
    out = {s: [] for s in seqs}
    for step in schedule:
        ids = [s for s, _ in step]
        ns = [n for _, n in step]
        toks = torch.cat([torch.as_tensor(seqs[s][done[s]:done[s] + n], dtype=torch.int64) for s, n in step]).to(model.device)
        assert all(len(seqs[s]) >= done[s] + n for s, n in step), "schedule runs past a sequence"
        batch, pos = prepare_step(cache, ids, ns)
        with torch.inference_mode():
            logits = model(toks, pos, batch, cache)
        a = 0
        for s, n in step:
            out[s].append(logits[a:a + n])
            a += n
            done[s] += n
    return {s: torch.cat(v) if v else torch.zeros(0) for s, v in out.items()}
