"""How the ``saga`` command lives as a process: the standard streams it may have been
started without, and Ctrl-C during an action on one run."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TextIO

from saga._aio import started_writes
from saga._cli_render import ClosedOutput, Discarded, _Ctx
from saga._cli_values import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, _Exit


@contextlib.contextmanager
def standard_streams() -> Iterator[None]:
    """Stand in for the standard streams the process was started without (``>&-``,
    ``2>&-``: Python then has None for them): stdout closed stops the output at its
    first line (exit 141), stderr closed drops the messages (the exit code still tells)."""
    saved = sys.stdout, sys.stderr
    if sys.stdout is None:
        sys.stdout = ClosedOutput()
    if sys.stderr is None:
        sys.stderr = Discarded()
    try:
        yield
    finally:
        sys.stdout = saved[0] if saved[0] is None else sys.stdout
        sys.stderr = saved[1] if saved[1] is None else sys.stderr


class LogStream:
    """The stream the command's log lines go to (stderr): once a write to it fails (its
    reader went away: ``2>&1 | head``, a log shipper restarting; a full disk), the
    lines are dropped and the command goes on: a worker does not die of its log. The
    stream's file then points at devnull, so that the interpreter's own flush at exit
    does not fail again."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lost = False

    def write(self, text: str) -> int:
        if not self._lost:
            try:
                self._stream.write(text)
            except (OSError, ValueError):
                self._lose()
        return len(text)

    def flush(self) -> None:
        if not self._lost:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                self._lose()

    def _lose(self) -> None:
        self._lost = True
        with contextlib.suppress(OSError, ValueError, AttributeError):  # not a real file
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)


def stdout_closed() -> int:
    """The reader of stdout went away (``saga show RUN | head -1``): stop quietly.

    The recipe of the Python docs ("Note on SIGPIPE"): point stdout at devnull, so that
    the interpreter's own flush at exit does not fail again with a traceback.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout is not a real file (a test's)
        pass
    return EXIT_BROKEN_PIPE


#: The commands that write one run's action: once started, they run to their end.
WRITES_ONE = frozenset(("signal", "cancel", "retry", "resolve", "skip-compensation"))


async def to_its_end(ctx: _Ctx, action: Awaitable[int]) -> int:
    """Run an action on one run; a Ctrl-C before its write started stops it (exit 130).
    Once its write is in flight (a signal waiting, say, for a row another transaction
    holds) an interrupt would not undo it: the action goes on to its end and reports
    what was written, with its own exit code. A second Ctrl-C aborts (exit 130)."""
    writes: list[asyncio.Future[Any]] = []
    interrupts = 0

    async def tracked() -> int:
        started_writes.set(writes)  # (in this task's own context)
        return await action

    task = asyncio.ensure_future(tracked())

    def on_sigint() -> None:
        nonlocal interrupts
        interrupts += 1
        if not writes:
            task.cancel()  # nothing written yet: the action stops where it is
        elif interrupts == 1:
            ctx.note(f"saga {ctx.args.command}: interrupted: finishing the write in flight "
                     "(Ctrl-C again to abort)")  # fmt: skip
        else:
            raise KeyboardInterrupt  # out of the event loop, whatever is in flight

    with _on_sigint(on_sigint):
        try:
            return await task
        except asyncio.CancelledError:
            if interrupts and task.cancelled():
                ctx.note("saga: interrupted")
                raise _Exit(EXIT_INTERRUPTED) from None
            raise


@contextlib.contextmanager
def _on_sigint(callback: Callable[[], None]) -> Iterator[None]:
    """``callback`` (in the event loop) handles SIGINT for the block, instead of the
    runner's cancelling of the whole command; only in the main thread (an in-process
    caller running the command in a thread keeps its own handling)."""
    loop = asyncio.get_running_loop()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.getsignal(signal.SIGINT)
    loop.add_signal_handler(signal.SIGINT, callback)
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        signal.signal(signal.SIGINT, before)
