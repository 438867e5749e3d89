"""`retrogram serve` (the gRPC servers) and `retrogram health` (ask a server's health service)."""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time
from pathlib import Path

from ..index.errors import UserError
from . import registry
from .cli_common import console, print_json

INDEX_ENV = "RETROGRAM_INDEX"
# Set in the environment of a server that a parent (the stack, the demo) starts: the child then leaves its
# startup error to the parent, which reads it from the child's "failed" event and says it once.
CHILD_ENV = "RETROGRAM_SERVER_CHILD"

SERVE_HELP = """\
Serve an index (and the decoder) over gRPC.

  retrogram serve --index DIR                   the stack: every service below that the index can back,
                                                each in its own process, on its loopback port; Ctrl-C
                                                stops all (--no-decoder: without the decoder)
  retrogram serve ngram --index DIR --port P    one service in this process (P=0: any free port)
  retrogram serve decoder [--index DIR] [--model DIR]
                                                the decoder alone (--index: its n-grams serve ngram_lambda)

A service answers health checks (grpc.health.v1) with NOT_SERVING until its index (or model) is loaded, and lists
itself through server reflection (grpcurl -plaintext HOST:PORT list). On SIGTERM or Ctrl-C it stops
taking calls, finishes those in flight (up to --grace seconds) and exits.

Binding beyond loopback (--host 0.0.0.0) needs API keys: --api-key-file FILE (one key a line) or
$RETROGRAM_API_KEY (comma-separated); clients send one in the `x-api-key` metadata. TLS with --tls-cert
and --tls-key (and --tls-client-ca to require client certificates).

Each service process prints a JSON line on stdout when it listens and when it serves
({"event": "listening"|"serving"|"failed", "address": ...}); logs are JSON lines on stderr.
"""


def add_server_flag(parser, service: str = "ngram") -> None:
    """`--server HOST:PORT` for a query command that can ask a running server instead of opening --index
    (then `client.connect(args.server, service)` stands in for the engine); repeatable for n-gram shard
    servers, whose answers the client combines."""
    more = "; repeat for shard servers, whose counts add" if service == "ngram" else ""
    parser.add_argument("--server", action="append", default=None, metavar="HOST:PORT",
                        help=f"ask a running {service} server (`retrogram serve`) instead of opening --index{more}; "
                             "the API key, if the server wants one, comes from $RETROGRAM_API_KEY")


def _add_server_options(p) -> None:
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; anything beyond loopback needs API keys)")
    p.add_argument("--api-key-file", type=Path, default=None, metavar="FILE",
                   help=f"require one of these API keys (one a line; also ${'RETROGRAM_API_KEY'})")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="allow binding beyond loopback without API keys")
    p.add_argument("--tls-cert", type=Path, default=None, metavar="PEM", help="serve TLS with this certificate chain")
    p.add_argument("--tls-key", type=Path, default=None, metavar="PEM", help="the certificate's private key")
    p.add_argument("--tls-client-ca", type=Path, default=None, metavar="PEM",
                   help="require client certificates signed by this CA (mutual TLS)")
    p.add_argument("--max-message-mb", type=float, default=64, metavar="MB",
                   help="largest request or response message (default 64 MiB)")
    p.add_argument("--max-concurrent-rpcs", type=int, default=256, metavar="N",
                   help="calls in progress at once; more are refused with RESOURCE_EXHAUSTED (default 256)")
    p.add_argument("--threads", type=int, default=0, metavar="N",
                   help="engine worker threads (default: the number of cores)")
    p.add_argument("--grace", type=float, default=30.0, metavar="S",
                   help="on shutdown, seconds given to calls in flight (default 30)")
    p.add_argument("--metrics-port", type=int, default=None, metavar="P",
                   help="serve Prometheus metrics over HTTP on this port (the stack: P for ngram, P+1 for "
                        "retriever, P+2 for decoder)")
    p.add_argument("--no-inline", action="store_true",
                   help="run every call on the worker threads (default: the smallest calls, a few microseconds "
                        "of engine work, run on the event loop, saving the hop to a thread)")
    p.add_argument("--io-cpu", type=int, default=None, metavar="CPU",
                   help="pin the event loop and grpc's I/O thread to this CPU (engine threads still use every "
                        "CPU): a lower single-call latency on a machine where that CPU is not busy (default: no pin)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--access-log", action="store_true", help="log every call (JSON lines on stderr)")


def register(sub) -> None:
    specs = registry.services()
    listing = "\n".join(f"  {s.name:<10} {s.description} (port {s.default_port})" for s in specs)
    p = sub.add_parser("serve", help="serve an index over gRPC (n-gram and retriever services)",
                       description=f"{SERVE_HELP}\nServices:\n{listing}\n",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("service", nargs="?", default="all", choices=["all", *registry.names()],
                   help="which service (default: all of the stack's, each in its own process)")
    p.add_argument("--index", type=Path, default=os.environ.get(INDEX_ENV), metavar="DIR",
                   help=f"the index directory (default ${INDEX_ENV})")
    ports = ", ".join(f"{s.default_port} {s.name}" for s in specs)
    p.add_argument("--port", type=int, default=None, metavar="P",
                   help=f"port of a single service (default {ports}; 0: any free port)")
    for s in registry.stack():
        p.add_argument(f"--{s.name}-port", type=int, default=s.default_port, metavar="P",
                       help=f"the stack's {s.name} port (default {s.default_port})")
    for s in registry.stack():
        p.add_argument(f"--no-{s.name}", action="store_true", help=f"the stack without the {s.name} service")
    p.add_argument("--port-name", default="--port", help=argparse.SUPPRESS)   # the port's flag in a parent's errors
    p.add_argument("--startup-timeout", type=float, default=600, metavar="S",
                   help="the stack: how long to wait for each service to load its index or model (default 600)")
    _add_server_options(p)
    _add_service_flags(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("health", help="ask a server's gRPC health service; exit 0 when SERVING",
                       description="Ask a server's standard health service (grpc.health.v1). Exit 0 when the "
                                   "service is SERVING, 1 otherwise (the docker-compose health check).")
    p.add_argument("server", metavar="HOST:PORT")
    p.add_argument("--service", default="", help="the service to ask about (default: the whole server), "
                   "e.g. retrogram.v1.NgramService")
    p.add_argument("--timeout", type=float, default=5.0, metavar="S")
    p.add_argument("--tls", action="store_true", help="connect with TLS")
    p.add_argument("--tls-ca", type=Path, default=None, metavar="PEM", help="CA certificate to trust")
    p.set_defaults(func=cmd_health)


def _add_service_flags(p) -> None:
    """Each service's own flags (registry Flag), in a group per service; a flag two services share is added once."""
    seen = {a.dest for a in p._actions}
    for s in registry.services():
        flags = [f for f in s.flags if f.dest not in seen]
        if not flags:
            continue
        group = p.add_argument_group(f"{s.name} service")
        for f in flags:
            group.add_argument(f.name, type=f.type, default=None, metavar=f.metavar, help=f.help)
            seen.add(f.dest)


def _config(args, port: int):
    from .serving import ServeConfig, load_api_keys

    return ServeConfig(host=args.host, port=port, api_keys=load_api_keys(args.api_key_file),
                       insecure_no_auth=args.insecure_no_auth, tls_cert=args.tls_cert, tls_key=args.tls_key,
                       tls_client_ca=args.tls_client_ca, max_message_bytes=int(args.max_message_mb * (1 << 20)),
                       max_concurrent_rpcs=args.max_concurrent_rpcs, threads=args.threads, grace_s=args.grace,
                       metrics_port=args.metrics_port, access_log=args.access_log,
                       inline_small_calls=not args.no_inline, io_cpu=args.io_cpu)


def make_service(name: str, args):
    """The registered service `name`, made from the `serve` arguments (an index service from --index)."""
    from .serving import IndexService

    cls = registry.get(name).load_class()
    if issubclass(cls, IndexService) and getattr(args, "index", None) is None:
        raise UserError(f"--index: required (or set ${INDEX_ENV})")
    return cls.from_args(args)


def cmd_serve(args) -> int:
    if args.service == "all":
        if args.index is None:
            raise UserError(f"--index: required (or set ${INDEX_ENV})")
        return serve_stack(args)
    from .serving import print_event, serve, setup_logging

    setup_logging(args.log_level)
    port = args.port if args.port is not None else registry.get(args.service).default_port
    try:
        try:
            check_port(args.host, port, args.port_name)
            svc, config = make_service(args.service, args), _config(args, port)
        except UserError as e:   # serve() announces its own failures
            print_event("failed", services=[args.service], error=str(e))
            raise
        return serve([svc], config)
    except UserError as e:
        if os.environ.get(CHILD_ENV) == "1":
            return e.exit_code   # the parent says why, from the "failed" event
        raise


def check_port_number(port: int, flag: str) -> None:
    if not 0 <= port <= 65535:
        raise UserError(f"{flag} {port}: expected a port number in [0, 65535] (0: any free port)")


def check_port(host: str, port: int, flag: str) -> None:
    """Refuse a port out of range or one that something already listens on, naming the flag (grpc itself
    would log a C-level error line and raise a RuntimeError that says only "Failed to bind")."""
    import errno
    import socket

    check_port_number(port, flag)
    if port == 0:
        return
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
    except OSError:
        return   # an unknown host: grpc says so
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as grpc binds: a TIME_WAIT port is free
        try:
            s.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UserError(f"{flag} {port}: {host}:{port} is already in use (another server is listening "
                                "there); stop it or choose another port") from None
            if e.errno == errno.EACCES:
                raise UserError(f"{flag} {port}: not allowed to listen on {host}:{port} (ports below 1024 need "
                                "privileges); choose another port") from None


# ---------------------------------------------------------------------------------------------- stack

def stack_services(index_dir: Path, args=None) -> tuple[list[str], dict[str, str]]:
    """Which of the stack's services an index can back (with the `serve` arguments given, less those left
    out by --no-NAME), and why the others cannot."""
    from ..index.manifest import Manifest

    manifest = Manifest.load(index_dir)
    have, why = [], {}
    ns = argparse.Namespace(**{**(vars(args) if args is not None else {}), "index": index_dir})
    for name in [s.name for s in registry.stack() if not getattr(ns, f"no_{s.name}", False)]:
        try:
            make_service(name, ns).check()
            have.append(name)
        except UserError as e:
            why[name] = str(e)
    if not have:
        raise UserError(f"{index_dir}: nothing to serve ({'; '.join(f'{k}: {v}' for k, v in why.items())}); "
                        f"stages built: {', '.join(manifest.stages) or 'none'}")
    return have, why


def _child_args(args, name: str) -> list[str]:
    """The options a stack child gets (beyond service, --index, --port, --host)."""
    argv = [f"--port-name=--{name}-port",
            "--max-message-mb", str(args.max_message_mb), "--max-concurrent-rpcs", str(args.max_concurrent_rpcs),
            "--threads", str(args.threads), "--grace", str(args.grace), "--log-level", args.log_level]
    for flag in ("api_key_file", "tls_cert", "tls_key", "tls_client_ca", "io_cpu"):
        v = getattr(args, flag)
        if v is not None:
            argv += ["--" + flag.replace("_", "-"), str(v)]
    if args.insecure_no_auth:
        argv.append("--insecure-no-auth")
    if args.access_log:
        argv.append("--access-log")
    if args.no_inline:
        argv.append("--no-inline")
    if args.metrics_port is not None:
        argv += ["--metrics-port", str(args.metrics_port + [s.name for s in registry.stack()].index(name))]
    for f in registry.get(name).flags:   # the service's own flags, those given
        v = getattr(args, f.dest, None)
        if v is not None:
            argv += [f.name, str(v)]
    return argv


def serve_stack(args) -> int:
    from .launch import ServerProcess

    if args.port is not None:
        raise UserError("--port is for a single service (retrogram serve ngram --port P); "
                        f"use {' / '.join(f'--{s.name}-port' for s in registry.stack())} for the stack")
    names, why = stack_services(args.index, args)
    ports = {s.name: getattr(args, f"{s.name}_port") for s in registry.stack()}
    for name in names:
        check_port(args.host, ports[name], f"--{name}-port")
    for name, reason in why.items():
        console.print(f"[yellow]not serving {name}[/]: {reason}")
    children: list[ServerProcess] = []
    stop = threading.Event()
    old = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    rc = 0
    try:
        for name in names:   # all start loading at once
            children.append(ServerProcess(name, args.index, ports[name], args.host, _child_args(args, name),
                                          env={CHILD_ENV: "1"}, capture_stderr=False))
        for c in children:
            ev, end = None, time.monotonic() + args.startup_timeout
            while ev is None and not stop.is_set() and time.monotonic() < end:   # Ctrl-C while loading: stop
                ev = c.wait_event({"serving", "failed", "exited"}, min(0.5, max(0.0, end - time.monotonic())))
            if stop.is_set():
                break
            if ev is None or ev["event"] != "serving":
                raise UserError(f"{c.service} service: {startup_failure(c, ev, args.startup_timeout)}")
            console.print(f"[bold green]{c.service:<9}[/] serving {args.index} on {c.address}")
            print_json({"event": "serving", "service": c.service, "address": c.address})
        console.print("[dim]Ctrl-C to stop[/]")
        while not stop.is_set():
            for c in children:
                if c.proc.poll() is not None:
                    console.print(f"[red]{c.service} service exited ({c.proc.returncode}); stopping the others[/]")
                    rc = 1
                    stop.set()
            stop.wait(0.5)
    finally:
        for c in children:
            c.signal(signal.SIGTERM)
        for c in children:
            c.stop(timeout=args.grace + 10)
        for s, h in old.items():
            signal.signal(s, h)
    console.print("stopped")
    return rc


def startup_failure(child, ev: dict | None, timeout: float) -> str:
    """Why a child server did not start, in one line: its "failed" event's error, else how it ended."""
    import subprocess

    if ev is not None and ev.get("error"):
        return ev["error"]
    if ev is None:
        return f"not serving after {timeout:g} s"
    try:
        rc = child.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        rc = None
    lines = [ln for ln in (child.stderr_text.splitlines() if child.proc.stderr is not None else []) if ln.strip()]
    last = f": {lines[-1].strip()}" if lines else ""
    return f"exited (code {rc}) before serving{last}"


# --------------------------------------------------------------------------------------------- health

def check_health(server: str, service: str = "", timeout: float = 5.0, tls: bool = False,
                 root_certificates: bytes | None = None) -> str:
    """The health status name (SERVING, NOT_SERVING, ...) or UNREACHABLE."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from .client import make_channel, parse_target

    ch = make_channel(parse_target(server), tls=tls, root_certificates=root_certificates, retries=False)
    try:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.NOT_FOUND:
            return "SERVICE_UNKNOWN"
        return "UNREACHABLE"
    finally:
        ch.close()


def cmd_health(args) -> int:
    roots = args.tls_ca.read_bytes() if args.tls_ca else None
    status = check_health(args.server, args.service, args.timeout, args.tls or roots is not None, roots)
    print(status)
    return 0 if status == "SERVING" else 1
