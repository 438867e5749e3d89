"""From generated token ids to streamed text: incremental detokenisation, stop strings, chat prompts.

    stream = TextStream(tokenizer, prompt_ids, params, eos_token_id=tokenizer.eos_token_id)
    for token in tokens:
        delta, finish = stream.push(token)      # text to send now; "stop" / "length" / None
        if finish: break

`IncrementalDetokenizer` decodes a short window of tokens (the last few already emitted plus the new ones)
and emits what the new tokens add to it, as vLLM and HF's TextStreamer do: decoding the window with
context keeps tokenizers that drop a leading space (SentencePiece) right, and a byte-level BPE token that
ends inside a UTF-8 character decodes to a trailing U+FFFD, so the text waits for the token that
completes it. `StopChecker` holds back text that may be the start of a stop string.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from ..index.errors import UserError
from .sampling import SamplingParams

REPLACEMENT = "\ufffd"
PROMPT_CONTEXT = 5   # prompt tokens decoded before the first new one, for the tokenizer's context


class IncrementalDetokenizer:
    """push(token_id) -> the new text (possibly ""); the deltas concatenate to the decoded output."""

    def __init__(self, tokenizer, prompt_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.ids = [int(t) for t in prompt_ids]
        self.read = len(self.ids)                     # ids[:read] are already emitted (or are the prompt)
        # a prompt ending inside a character: the text starts with the whole character once completed
        while self.read > 0 and self._decode(max(0, self.read - PROMPT_CONTEXT), self.read).endswith(REPLACEMENT):
            self.read -= 1
        self.prefix = max(0, self.read - PROMPT_CONTEXT)  # ids[prefix:read]: context for the next decode

    def _decode(self, a: int, b: int) -> str:
        return self.tokenizer.decode(self.ids[a:b])

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        """The text still held back (an unfinished character, decoded with U+FFFD): at the end only."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        before = self._decode(self.prefix, self.read)
        text = self._decode(self.prefix, len(self.ids))
        if len(text) <= len(before) or (text.endswith(REPLACEMENT) and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]


class StopChecker:
    """push(text) -> (text safe to emit, stopped). Text that could begin a stop string is held until it
    cannot; when a stop string completes, the text before it is emitted and nothing after."""

    def __init__(self, stop: Sequence[str]):
        self.stop = [s for s in stop if s]
        self.held = ""
        self.stopped = False

    def push(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.held, self.stopped = "", True
            return buf[:min(hits)], True
        keep = max((k for s in self.stop for k in range(min(len(s) - 1, len(buf)), 0, -1)
                    if buf.endswith(s[:k])), default=0)   # the longest tail that begins some stop string
        self.held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        """The held text, at the end of a generation that did not stop on a string."""
        out, self.held = ("" if self.stopped else self.held), ""
        return out


class TextStream:
    """One request's tokens -> (text delta, finish_reason) with its stop conditions: a stop string or a
    stop token ("stop": neither is part of the text), end of sequence unless ignore_eos ("stop"),
    max_tokens ("length")."""

    def __init__(self, tokenizer, prompt_ids: Sequence[int], params: SamplingParams, eos_token_id: int | None = None):
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.stops = StopChecker(params.stop)
        self.stop_ids = set(params.stop_token_ids)
        if eos_token_id is not None and not params.ignore_eos:
            self.stop_ids.add(int(eos_token_id))
        self.max_tokens = params.max_tokens
        self.n = 0
        self.finish_reason: str | None = None

    def push(self, token_id: int) -> tuple[str, str | None]:
        if self.finish_reason is not None:
            raise RuntimeError(f"TextStream: pushed a token after the stream finished ({self.finish_reason})")
        self.n += 1
        if int(token_id) in self.stop_ids:
            return self._finish("stop")
        text, stopped = self.stops.push(self.detok.push(token_id))
        if stopped:
            self.finish_reason = "stop"
            return text, "stop"
        if self.n >= self.max_tokens:
            more, _ = self._finish("length")
            return text + more, self.finish_reason
        return text, None

    def _finish(self, reason: str) -> tuple[str, str]:
        text, stopped = self.stops.push(self.detok.flush())   # a held tail may still complete a stop string
        self.finish_reason = "stop" if stopped else reason
        return text + self.stops.flush(), self.finish_reason


@functools.lru_cache(maxsize=8)
def _hf_tokenizer(directory: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory, local_files_only=True)


def chat_template_tokenizer(tokenizer):
    """The transformers tokenizer behind an HFTokenizer (loaded from the directory its files came from,
    where the chat template lives: chat_template.jinja or tokenizer_config.json); None without one."""
    files = getattr(tokenizer, "files", None)
    if not files:
        return None
    hf = _hf_tokenizer(str(files[0].parent))
    return hf if hf.chat_template else None


def apply_chat_template(tokenizer, messages: str | Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
    """Prompt ids for a chat (a list of {"role", "content"}) or a single user message (a str), through the
    tokenizer's own template. A str with a tokenizer that has no template is encoded as it is (a base
    model's prompt)."""
    hf = chat_template_tokenizer(tokenizer)
    if isinstance(messages, str):
        if hf is None:
            return [int(t) for t in tokenizer.encode(messages)]
        messages = [{"role": "user", "content": messages}]
    if hf is None:
        raise UserError(f"messages: tokenizer {getattr(tokenizer, 'name', '?')!r} has no chat template; "
                        "give a plain prompt")
    if not messages or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                               and isinstance(m.get("content"), str) for m in messages):
        raise UserError("messages: expected a non-empty list of {'role': str, 'content': str}")
    ids = hf.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt, tokenize=True,
                                 return_dict=False)
    return [int(t) for t in ids]
