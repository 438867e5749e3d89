"""A small real service for the host's tests (test_services_host.py): a servicer of a test-only proto
(TICKER_PROTO there, compiled at test time with grpcio-tools into a directory put on sys.path) with every kind
of method serving.Service hosts — sync, async (one awaits a real n-gram server, as a gateway does),
async-generator and generator streams — plus a Session and an async load() that waits for a gate the test
opens."""

from __future__ import annotations

import asyncio
import threading

import ticker_pb2 as pb
from retrogram.services.serving import CallContext, Service, invalid


class Ticker(Service):
    name = "ticker"
    kind = "model"
    descriptor = pb.DESCRIPTOR.services_by_name["Ticker"]

    def __init__(self, ngram_address: str | None = None, gate: bool = False):
        super().__init__()
        self.ngram_address = ngram_address
        self.ngram = None
        self.gate = threading.Event()   # load() waits for it (the test opens it)
        if not gate:
            self.gate.set()
        self.ended: list[str] = []      # how each call of Hang / Ticks / SyncTicks ended
        self.ended_event = threading.Event()

    @classmethod
    def from_args(cls, args) -> Ticker:
        return cls()

    def describe(self) -> str:
        return "ticker"

    def _end(self, how: str) -> None:
        self.ended.append(how)
        self.ended_event.set()

    async def load(self) -> None:
        # on the server's loop: the async client's channel belongs to it
        await asyncio.get_running_loop().run_in_executor(None, self.gate.wait)
        if self.ngram_address:
            from retrogram.services.client import AsyncNgramClient

            self.ngram = AsyncNgramClient(self.ngram_address)
            await self.ngram.info()

    async def close(self) -> None:
        if self.ngram is not None:
            await self.ngram.close()

    def Add(self, request, ctx: CallContext):
        return pb.Tick(n=request.n + 1, text=threading.current_thread().name)

    async def CountVia(self, request, ctx: CallContext):
        if not request.text:
            raise invalid("text: expected a query")
        r = await self.ngram.count(request.text)
        return pb.Tick(n=r["count"], text=request.text)

    async def Hang(self, request, ctx: CallContext):
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self._end("cancelled")
            raise
        return pb.Tick()

    async def Ticks(self, request, ctx: CallContext):
        how = "done"
        try:
            n = request.start
            while request.count == 0 or n < request.start + request.count:
                yield pb.Tick(n=n)
                n += 1
                if request.hang:
                    await asyncio.Event().wait()
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            how = "cancelled"   # where it awaited
            raise
        except GeneratorExit:
            how = "closed"      # at its yield
            raise
        finally:
            self._end(how)

    def SyncTicks(self, request, ctx: CallContext):
        for n in range(request.start, request.start + request.count):
            ctx.check()
            yield pb.Tick(n=n)
