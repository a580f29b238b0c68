"""A worker process, driven by the benchmark over stdin/stdout (one JSON object a line).

    python -m benchmarks._worker            # a worker: saga orchestrator or plain queue
    python -m benchmarks._worker receiver   # a dummy OTLP/HTTP receiver on 127.0.0.1

Worker commands (each answered by one line; errors by ``{"event": "error", ...}``):

- ``{"cmd": "open", "kind": "saga", "dsn": ..., "saga": "noop"|"compensate"|"gate",
  "concurrency": C, "tracing": null | {"endpoint": ...}, "gate_target": N,
  "count_calls": bool, "pool_size": null | N}`` opens ``saga.Orchestrator(dsn,
  sagas=[...], concurrency=C, migrate=False)`` (defaults otherwise; with ``pool_size``,
  on an application-owned pool of N connections) -> ``{"event": "opened"}``. With the
  ``gate`` saga, the first step of every run waits until ``release``; once
  ``gate_target`` steps wait, the worker says ``{"event": "gate_full"}`` by itself.
- ``{"cmd": "open", "kind": "queue", "dsn": ..., "concurrency": C, "batch": null | B}``
  starts C tasks of the hand-written SKIP LOCKED queue (``benchmarks/_queue.py``; with
  ``batch``, the batched one, B jobs per claim) -> ``opened``.
- ``{"cmd": "start", "runs": N}`` starts N runs through the open saga orchestrator (the
  embedded setup: STARTERS concurrent tasks, while the same orchestrator executes them)
  -> ``{"event": "started"}``.
- ``{"cmd": "release"}`` -> ``{"event": "released"}``.
- ``{"cmd": "close"}`` closes what is open -> ``{"event": "closed", "spans": {...},
  "calls": {...}}`` (spans: exported/dropped counts when traced; calls: saga Store calls
  when opened with ``"count_calls": true``).

End of input closes everything and exits. structlog and logging are set to WARNING; both
log to stderr (stdout is the protocol).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from typing import TYPE_CHECKING, Any

import asyncpg

import saga
from benchmarks import _internals, _queue
from benchmarks._base import configure_logging, start_concurrently
from benchmarks._sagas import KINDS, Input, build

if TYPE_CHECKING:
    from benchmarks._otel import Tracing


def emit(**message: object) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


_tracing: Tracing | None = None


def tracing_for(spec: dict[str, Any] | None) -> Tracing | None:
    """One SDK setup per process (providers are process-long objects). Imported only
    when asked for: an untraced worker never loads the SDK (its RSS is measured)."""
    global _tracing
    if spec is None:
        return None
    if _tracing is None:
        from benchmarks._otel import Tracing

        _tracing = Tracing(spec["endpoint"])
    return _tracing


class Worker:
    def __init__(self) -> None:
        self.stack: contextlib.AsyncExitStack | None = None
        self.gate = asyncio.Event()
        self.waiting = 0
        self.gate_target = 0
        self.tracing: Tracing | None = None
        self.spans_before: dict[str, int] = {}
        self.orch: saga.Orchestrator | None = None
        self.definition: saga.Saga[Input] | None = None

    async def _gate(self) -> None:
        self.waiting += 1
        if self.waiting == self.gate_target:
            emit(event="gate_full", waiting=self.waiting)
        await self.gate.wait()

    async def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        name = cmd["cmd"]
        if name == "open":
            await self.open(cmd)
            return {"event": "opened"}
        if name == "start":
            await self.start_runs(int(cmd["runs"]))
            return {"event": "started"}
        if name == "release":
            self.gate.set()
            return {"event": "released"}
        if name == "close":
            await self.close()
            return {"event": "closed", "spans": self._spans(), "calls": _internals.take_calls()}
        raise ValueError(f"unknown command {name!r}")

    async def open(self, cmd: dict[str, Any]) -> None:
        if self.stack is not None:
            raise RuntimeError("already open")
        stack = contextlib.AsyncExitStack()
        try:
            if cmd["kind"] == "saga":
                await self._open_saga(stack, cmd)
            else:
                await self._open_queue(stack, cmd)
        except BaseException:
            await stack.aclose()
            raise
        self.stack = stack

    async def start_runs(self, runs: int) -> None:
        """Start ``runs`` runs through the open orchestrator, which executes them too."""
        orch, definition = self.orch, self.definition
        if orch is None or definition is None:
            raise RuntimeError("no saga orchestrator is open")
        await start_concurrently(runs, lambda i: orch.start(definition, Input(i=i)))

    def _spans(self) -> dict[str, int]:
        if self.tracing is None:
            return {}
        after = self.tracing.flush()
        self.tracing = None
        return {k: v - self.spans_before.get(k, 0) for k, v in after.items()}

    async def _open_saga(self, stack: contextlib.AsyncExitStack, cmd: dict[str, Any]) -> None:
        kind = {k: k for k in KINDS}[cmd["saga"]]  # a Kind, or KeyError
        gate = None
        if kind == "gate":
            self.gate, self.waiting = asyncio.Event(), 0
            self.gate_target = int(cmd.get("gate_target") or 0)
            gate = self._gate
        _internals.take_calls()
        if cmd.get("count_calls"):
            _internals.count_store_calls()
        self.tracing = tracing_for(cmd.get("tracing"))
        if self.tracing is not None:
            self.spans_before = dict(self.tracing.counts)
        target: str | asyncpg.Pool = cmd["dsn"]
        if cmd.get("pool_size"):
            target = await asyncpg.create_pool(
                cmd["dsn"], min_size=1, max_size=int(cmd["pool_size"]), reset=_queue.no_reset
            )
            stack.push_async_callback(target.close)
        definition = build(kind, gate)
        orch = saga.Orchestrator(
            target,
            sagas=[definition],
            concurrency=int(cmd["concurrency"]),
            migrate=False,
            tracer_provider=self.tracing.tracer_provider if self.tracing else None,
            meter_provider=self.tracing.meter_provider if self.tracing else None,
        )
        await stack.enter_async_context(orch)
        self.orch, self.definition = orch, definition

    async def _open_queue(self, stack: contextlib.AsyncExitStack, cmd: dict[str, Any]) -> None:
        concurrency = int(cmd["concurrency"])
        pool = await asyncpg.create_pool(
            cmd["dsn"], min_size=1, max_size=_queue.pool_size(concurrency), reset=_queue.no_reset
        )
        stack.push_async_callback(pool.close)
        stop = asyncio.Event()
        batch = cmd.get("batch")
        tasks = [
            asyncio.create_task(
                _queue.batch_task(pool, f"q{i}", stop, int(batch))
                if batch
                else _queue.task(pool, f"q{i}", stop)
            )
            for i in range(concurrency)
        ]

        async def finish() -> None:
            stop.set()
            await asyncio.gather(*tasks)

        stack.push_async_callback(finish)

    async def close(self) -> None:
        stack, self.stack = self.stack, None
        self.orch = self.definition = None
        if stack is not None:
            self.gate.set()
            await stack.aclose()


async def worker_main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    worker = Worker()
    try:
        while line := await reader.readline():
            try:
                reply = await worker.handle(json.loads(line))
            except Exception as exc:
                emit(event="error", message=f"{type(exc).__name__}: {exc}")
            else:
                emit(**reply)
    finally:
        await worker.close()


if __name__ == "__main__":
    configure_logging()
    if sys.argv[1:] == ["receiver"]:
        from benchmarks._otel import receiver_main

        receiver_main()
    elif sys.argv[1:2] == ["spancost"]:
        from benchmarks._spancost import main

        main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        asyncio.run(worker_main())
