"""Load and latency of the gRPC services, on loopback only, bounded in time.

    python -m bench.services.load --index IDX [--retriever-index IDX2] [--duration 60] [--clients 64]

Phases (each against a server started here in its own process, `retrogram serve SERVICE`):
  engine      the in-process engine's single-core rate: `count` one call per query, `count_many` and
              `count_packed` in batches (one thread, same queries)
  latency     one client, one Count at a time (grpc I/O variants, interleaved rounds, fresh processes each):
              p50/p99 round trip of NgramClient.count (over its Session stream) and of unary calls;
              gRPC overhead = round trip minus the engine's own time for the same query (its in-process p50)
  count       CLIENTS concurrent clients (each its own channel), unary Count, for DURATION seconds
  count_session  the same, each client sending its Counts one at a time over its own Session stream
  count_many  CLIENTS concurrent clients, CountMany of BATCH packed queries a call, for DURATION seconds:
              counts/s against the engine's single-core rate
  retrieve    CLIENTS concurrent clients, Retrieve (one text query, k=2), for DURATION seconds
Clients run in CLIENT_PROCS worker processes (asyncio, grpc.aio), so the client side is not one GIL.
Every call's outcome is counted: the target is zero failed calls. Results: services_<tag>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from bench import common
from bench.common import percentile as pct


def sample_queries(engine, n: int, seed: int = 0) -> list[list[int]]:
    """n-grams of 1..8 tokens taken from the corpus (so most occur), from random positions."""
    rng = np.random.default_rng(seed)
    out = []
    shard = engine.shards[0]
    toks = shard.tokens
    sep = engine.sep
    while len(out) < n:
        L = int(rng.integers(1, 9))
        p = int(rng.integers(0, len(toks) - L))
        q = toks[p:p + L].tolist()
        if sep in q:
            continue
        out.append(q)
    return out


# ------------------------------------------------------------------------------------------ workers

class CallFailed(Exception):
    """A Session answer with an error status."""


def _worker(kind: str, address: str, payload: bytes, tasks: int, duration: float, start_at: float, q):
    """One client process: `tasks` concurrent clients, each on its own channel, calling until the end."""
    import grpc

    from retrogram.protos import common_pb2 as cpb

    method = {"count": "/retrogram.v1.NgramService/Count", "count_many": "/retrogram.v1.NgramService/CountMany",
              "count_session": "/retrogram.v1.NgramService/Session",
              "retrieve": "/retrogram.v1.RetrieverService/Retrieve"}[kind]

    async def client(lat, errors):
        async with grpc.aio.insecure_channel(address) as ch:
            if kind == "count_session":   # one Session stream per client, one Count at a time on it
                stream = ch.stream_stream(method)()
                message = cpb.SessionRequest(id=1, method="Count", request=payload).SerializeToString()

                async def call(_payload, timeout):
                    await stream.write(message)
                    r = cpb.SessionResponse.FromString(await asyncio.wait_for(stream.read(), timeout))
                    if r.code:
                        raise CallFailed(f"code {r.code}: {r.message}")
            else:
                call = ch.unary_unary(method)
            await ch.channel_ready()
            while time.time() < start_at:
                await asyncio.sleep(0.001)
            end = start_at + duration
            while time.time() < end:
                t0 = time.perf_counter()
                try:
                    await call(payload, timeout=30)
                    lat.append(time.perf_counter() - t0)
                except grpc.RpcError as e:
                    errors.append(f"{e.code().name}: {e.details()}")
                except (CallFailed, asyncio.TimeoutError) as e:
                    errors.append(repr(e))
            if kind == "count_session":
                await stream.done_writing()

    async def main():
        lat, errors = [], []
        await asyncio.gather(*(client(lat, errors) for _ in range(tasks)))
        return lat, errors

    lat, errors = asyncio.run(main())
    q.put((lat, errors[:20], len(errors)))


def run_load(kind: str, address: str, payload: bytes, clients: int, procs: int, duration: float) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    per = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    start_at = time.time() + 3.0   # every client connected before the clock starts
    ps = [ctx.Process(target=_worker, args=(kind, address, payload, n, duration, start_at, q)) for n in per if n]
    for p in ps:
        p.start()
    lat, samples, failed = [], [], 0
    for _ in ps:
        a, s, f = q.get(timeout=duration + 120)
        lat += a
        samples += s
        failed += f
    for p in ps:
        p.join()
    return {"clients": clients, "client_processes": len(ps), "duration_s": duration, "calls": len(lat) + failed,
            "failed": failed, "error_samples": samples[:5], "calls_per_s": len(lat) / duration,
            "p50_us": pct(lat, 50) * 1e6 if lat else None, "p99_us": pct(lat, 99) * 1e6 if lat else None}


# ------------------------------------------------------------------------------------------- phases

def engine_rates(engine, queries, batch: int, seconds: float = 3.0) -> dict:
    """Single-core (one thread) in-process rates: count per call, count_many and count_packed in batches
    (the fastest of them is the single-core rate gRPC is compared with)."""
    for q in queries[:1000]:
        engine.count(q)
    lat = []
    n = 0
    t_end = time.perf_counter() + seconds
    t0 = time.perf_counter()
    while time.perf_counter() < t_end:
        for q in queries[:2000]:
            t = time.perf_counter()
            engine.count(q)
            lat.append(time.perf_counter() - t)
        n += 2000
    count_rate = n / (time.perf_counter() - t0)
    batches = [queries[i:i + batch] for i in range(0, len(queries) - batch + 1, batch)]
    engine.count_many(batches[0])
    n = 0
    t0 = time.perf_counter()
    t_end = t0 + seconds
    while time.perf_counter() < t_end:
        for b in batches:
            engine.count_many(b)
            n += len(b)
    many_rate = n / (time.perf_counter() - t0)
    packed = [(np.array([t for q in b for t in q]), np.array([len(q) for q in b])) for b in batches]
    n = 0
    t0 = time.perf_counter()
    t_end = t0 + seconds
    while time.perf_counter() < t_end:
        for ids, lengths in packed:
            engine.count_packed(ids, lengths)
            n += len(lengths)
    packed_rate = n / (time.perf_counter() - t0)
    return {"count_per_s": count_rate, "count_p50_us": pct(lat, 50) * 1e6, "count_many_per_s": many_rate,
            "count_packed_per_s": packed_rate, "count_many_batch": batch,
            "single_core_rate": max(count_rate, many_rate, packed_rate)}


def latency(address: str, queries, engine_p50_us: float, n: int = 3000) -> dict:
    """Sequential Count round trips, four ways interleaved call by call: NgramClient as users get it (small
    calls over its Session stream), NgramClient with sessions=False (one unary call each), the same unary
    Count on a bare channel (raw bytes, no retrogram client code) and, for scale, the same server's standard
    health Check (grpcio's own servicer: the floor of a unary Python gRPC round trip on this machine now)."""
    from retrogram.services.client import LOW_LATENCY_IO, NgramClient   # before grpc: it picks grpc's I/O

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from retrogram.protos import common_pb2 as cpb
    from retrogram.protos import ngram_pb2 as npb

    raws = [npb.CountRequest(query=cpb.Query(ids=q)).SerializeToString() for q in queries[:1000]]
    with NgramClient(address) as c, NgramClient(address, sessions=False) as u, grpc.insecure_channel(address) as ch:
        h = health_pb2_grpc.HealthStub(ch)
        raw_count = ch.unary_unary("/retrogram.v1.NgramService/Count")
        hreq = health_pb2.HealthCheckRequest()
        ways = [lambda i, q: c.count(q), lambda i, q: u.count(q), lambda i, q: raw_count(raws[i % len(raws)]),
                lambda i, q: h.Check(hreq)]
        for i, q in enumerate(queries[:300]):
            for way in ways:
                way(i, q)
        lats: list[list[float]] = [[] for _ in ways]
        for i in range(n):
            q = queries[i % len(queries)]
            for way, lat in zip(ways, lats):
                t = time.perf_counter()
                way(i, q)
                lat.append(time.perf_counter() - t)
        assert c._sessions[0] is not None, "the client's session did not stay open"
    lat, ulat, rlat, hlat = lats
    p50 = pct(lat, 50) * 1e6
    return {"calls": n, "rtt_p50_us": p50, "rtt_p99_us": pct(lat, 99) * 1e6, "engine_p50_us": engine_p50_us,
            "overhead_p50_us": p50 - engine_p50_us, "target_overhead_p50_us": 300,
            "unary_rtt_p50_us": pct(ulat, 50) * 1e6, "unary_rtt_p99_us": pct(ulat, 99) * 1e6,
            "bare_channel_count_rtt_p50_us": pct(rlat, 50) * 1e6,
            "health_check_rtt_p50_us": pct(hlat, 50) * 1e6, "low_latency_io": LOW_LATENCY_IO,
            "grpc_experiments": os.environ.get("GRPC_EXPERIMENTS", ""), "load_avg": os.getloadavg()}


# Variants of grpc's socket I/O, the same on server and client (each side picks it when grpc is first
# imported, so every variant runs in fresh processes): this code's default (grpc core's
# posix iomgr polling, LOW_LATENCY_IO) and grpcio's own default (EventEngine).
# Plus the opt-in pin of the server's event loop and grpc poller thread to one CPU (--io-cpu).
IO_VARIANTS = {"iomgr_polling": ({}, []), "event_engine": ({"RETROGRAM_GRPC_EVENT_ENGINE": "1"}, []),
               "iomgr_polling+io_cpu": ({}, ["--io-cpu", str(max(os.sched_getaffinity(0)))])}


def _variant_env(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("GRPC_EXPERIMENTS", "RETROGRAM_GRPC_EVENT_ENGINE")}
    env.update(extra)
    return env


def latency_variants(index: Path, engine_p50_us: float, reps: int, n: int) -> dict:
    """Each I/O variant x (small calls inline | every call on a thread), `reps` rounds interleaved; each
    round a fresh server process and a fresh client process. Medians of the rounds' p50s."""
    import subprocess

    from retrogram.services.launch import ServerProcess

    runs: dict = {}
    for _ in range(reps):
        for name, (extra, server_args) in IO_VARIANTS.items():
            env = _variant_env(extra)
            for inline, args in (("inline", []), ("no_inline", ["--no-inline"])):
                if inline == "no_inline" and server_args:
                    continue
                with ServerProcess("ngram", index, extra_args=args + server_args, env=env).wait_serving() as srv:
                    # the client in a fresh process too: this module, from the repository root
                    out = subprocess.run([sys.executable, "-m", __spec__.name, "--index", str(index),
                                          "--latency-client", srv.address, "--engine-p50-us", str(engine_p50_us),
                                          "--calls", str(n)], cwd=common.REPO,
                                         env=env, capture_output=True, text=True, check=True)
                r = json.loads(out.stdout)
                runs.setdefault(f"{name}/{inline}", []).append(r)
                print(f"{name}/{inline}: rtt p50 {r['rtt_p50_us']:.0f} us (session), unary {r['unary_rtt_p50_us']:.0f}, "
                      f"bare {r['bare_channel_count_rtt_p50_us']:.0f}, "
                      f"health {r['health_check_rtt_p50_us']:.0f}, load {r['load_avg'][0]:.1f}", file=sys.stderr)
    summary = {}
    for key, rs in runs.items():
        med = {m: statistics.median(r[m] for r in rs) for m in
               ("rtt_p50_us", "rtt_p99_us", "unary_rtt_p50_us", "unary_rtt_p99_us", "bare_channel_count_rtt_p50_us",
                "health_check_rtt_p50_us")}
        med["overhead_p50_us"] = med["rtt_p50_us"] - engine_p50_us
        med["rounds"] = [{k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()
                          if k in ("rtt_p50_us", "unary_rtt_p50_us", "bare_channel_count_rtt_p50_us",
                                   "health_check_rtt_p50_us",
                                   "load_avg", "grpc_experiments")} for r in rs]
        summary[key] = med
    return summary


def main(argv=None) -> int:
    ap = common.parser(__doc__, __spec__)
    ap.add_argument("--index", type=Path, required=True, help="an index with the ngram stage")
    ap.add_argument("--retriever-index", type=Path, default=None, help="an index with the faiss stage (default --index "
                    "if it has one; else the retrieve phase is skipped)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds per load phase (default 60)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--client-procs", type=int, default=2, help="worker processes the clients run in")
    ap.add_argument("--batch", type=int, default=10000, help="queries per CountMany (default 10000)")
    ap.add_argument("--phases", default="engine,latency,count,count_session,count_many,retrieve")
    ap.add_argument("--reps", type=int, default=3, help="rounds of the latency variants (default 3)")
    ap.add_argument("--calls", type=int, default=3000, help="sequential calls per latency measurement")
    ap.add_argument("--latency-client", metavar="ADDRESS", help=argparse.SUPPRESS)   # one latency run (a child)
    ap.add_argument("--engine-p50-us", type=float, default=0.0, help=argparse.SUPPRESS)
    common.add_output_args(ap)
    args = ap.parse_args(argv)
    if args.latency_client:
        from retrogram.services import client as _client  # noqa: F401 - picks grpc's I/O before grpc loads
        from retrogram.ngram import Engine

        qs = sample_queries(Engine(args.index), 20000)
        print(json.dumps(latency(args.latency_client, qs, args.engine_p50_us, args.calls)))
        return 0
    if args.duration <= 0 or args.duration > 600:
        ap.error("--duration: 0 < seconds <= 600")
    phases = set(args.phases.split(","))

    from retrogram.index.manifest import Manifest
    from retrogram.ngram import Engine
    from retrogram.protos import common_pb2 as cpb
    from retrogram.protos import ngram_pb2 as npb
    from retrogram.protos import retriever_pb2 as rpb
    from retrogram.services.launch import ServerProcess

    engine = Engine(args.index)
    queries = sample_queries(engine, 20000)
    res: dict = {"load_avg_at_start": os.getloadavg(),
                 "index": {"path": str(args.index), "tokens": engine.get_total_tok_cnt(),
                           "documents": engine.get_total_doc_cnt()},
                 "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    print(f"index: {res['index']}", file=sys.stderr)
    eng = engine_rates(engine, queries, args.batch)
    res["engine"] = eng
    print(f"engine: {json.dumps(eng)}", file=sys.stderr)

    if "latency" in phases:   # I/O variants x (small calls on the event loop | every call on a thread)
        lv = latency_variants(args.index, eng["count_p50_us"], args.reps, args.calls)
        res["latency_variants"] = lv
        res["latency"] = dict(lv["iomgr_polling/inline"], engine_p50_us=eng["count_p50_us"],
                              target_overhead_p50_us=300)
        res["latency_no_inline"] = lv["iomgr_polling/no_inline"]
        print(f"latency: {json.dumps(res['latency'])}", file=sys.stderr)
    if phases & {"count", "count_session", "count_many"}:
        with ServerProcess("ngram", args.index).wait_serving() as srv:
            for kind in ("count", "count_session"):
                if kind in phases:
                    payload = npb.CountRequest(query=cpb.Query(ids=queries[0])).SerializeToString()
                    res[kind] = run_load(kind, srv.address, payload, args.clients, args.client_procs, args.duration)
                    res[kind]["counts_per_s"] = res[kind]["calls_per_s"]
                    print(f"{kind}: {json.dumps(res[kind])}", file=sys.stderr)
            if "count_many" in phases:
                batch = queries[:args.batch]
                payload = npb.CountManyRequest(packed=cpb.PackedQueries(
                    ids=[t for q in batch for t in q], lengths=[len(q) for q in batch])).SerializeToString()
                r = run_load("count_many", srv.address, payload, args.clients, args.client_procs, args.duration)
                r["batch"] = args.batch
                r["counts_per_s"] = r["calls_per_s"] * args.batch
                r["vs_engine_single_core"] = r["counts_per_s"] / eng["single_core_rate"]
                r["target_vs_engine_single_core"] = 0.5
                res["count_many"] = r
                print(f"count_many: {json.dumps(r)}", file=sys.stderr)

    ridx = args.retriever_index or args.index
    if "retrieve" in phases and "faiss" in Manifest.load(ridx).stages:
        with ServerProcess("retriever", ridx).wait_serving(timeout=600) as srv:
            payload = rpb.RetrieveRequest(queries=[rpb.RetrieveQuery(text="who killed the king?")],
                                          k=2).SerializeToString()
            r = run_load("retrieve", srv.address, payload, args.clients, args.client_procs, args.duration)
            r["index"] = str(ridx)
            res["retrieve"] = r
            print(f"retrieve: {json.dumps(r)}", file=sys.stderr)
    res["load_avg_at_end"] = os.getloadavg()
    print(f"wrote {common.save('services', res, out=args.out, tag=args.tag)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
