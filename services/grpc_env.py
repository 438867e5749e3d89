"""The grpc environment every retrogram process shares, and the constants its clients and servers agree on.

Import this module before `grpc` (serving.py and client.py import it first): grpc core reads
GRPC_EXPERIMENTS once, when grpc is first imported, and the I/O choice below is made through it.
"""

from __future__ import annotations

import os
import sys

EVENT_ENGINE_ENV = "RETROGRAM_GRPC_EVENT_ENGINE"
LEGACY_IO_EXPERIMENTS = "-event_engine_client,-event_engine_listener"


def _prefer_low_latency_io() -> bool:
    """Route client and listener sockets through grpc core's posix iomgr polling instead of its EventEngine:
    the thread that waits on the completion queue polls the socket itself, one thread hand-off less per call
    in each process (on this 2-core box ~60 µs p50 off a loopback round trip; bench/results/
    services.json, latency_variants). Not done when GRPC_EXPERIMENTS is already set, when grpc was imported before
    this module, or with RETROGRAM_GRPC_EVENT_ENGINE=1."""
    if "grpc" in sys.modules or os.environ.get(EVENT_ENGINE_ENV, "") not in ("", "0"):
        return False
    if "GRPC_EXPERIMENTS" in os.environ:
        return False
    os.environ["GRPC_EXPERIMENTS"] = LEGACY_IO_EXPERIMENTS   # inherited by servers started from here
    return True


LOW_LATENCY_IO = _prefer_low_latency_io()

import grpc  # noqa: E402 - after the I/O choice above

# -- what clients and servers agree on

API_KEY_HEADER = "x-api-key"               # the metadata key a client sends its API key in
API_KEY_ENV = "RETROGRAM_API_KEY"          # servers: the accepted keys (comma-separated); clients: the key sent
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20       # largest request or response message, both ends
SESSION_METHOD = "Session"                 # a service's bidi stream of unary calls (protos/common.proto)
SESSION_MIN_TIMEOUT_S = 1.0                # calls with shorter deadlines go unary (the sync client's watchdog)

CODE_BY_NAME = {c.name: c for c in grpc.StatusCode}
CODE_BY_VALUE = {c.value[0]: c for c in grpc.StatusCode}   # the numbers a SessionResponse carries


def env_api_key() -> str | None:
    """The key a client sends: the first of $RETROGRAM_API_KEY, or None."""
    return os.environ.get(API_KEY_ENV, "").split(",")[0].strip() or None
