"""trio, run as a guest on textual's asyncio loop, for the explorer's model calls.

textual runs on asyncio; the image the explorer shows (`ckfs.inspect.ImageLayers`)
is a trio object: its reads go through trio-bound registry connections and
its index work through ``trio.to_thread``. trio's guest mode runs a trio
run inside the asyncio loop, on the same thread, so the UI awaits model
calls as ordinary coroutines: no second thread owns the image, and nothing
is handed between event loops.

Lifetime: ``async with TrioPortal() as portal`` starts the trio run;
leaving the block closes every context `enter` opened (the image, its
connections), uncancelled, then cancels calls still running, and waits for
the run to end.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, TypeVar

import outcome
import trio

__all__ = ["TrioPortal"]

T = TypeVar("T")


class TrioPortal:
    """Runs trio coroutines for asyncio callers (module docstring)."""

    def __init__(self) -> None:
        self._token: trio.lowlevel.TrioToken | None = None
        self._calls: trio.Nursery | None = None
        self._holders: trio.Nursery | None = None
        self._closing: trio.Event | None = None
        self._entering: set[trio.CancelScope] = set()
        self._done: asyncio.Future[outcome.Outcome[None]] | None = None

    async def __aenter__(self) -> TrioPortal:
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        done: asyncio.Future[outcome.Outcome[None]] = loop.create_future()
        self._done = done
        trio.lowlevel.start_guest_run(
            self._main,
            ready,
            run_sync_soon_threadsafe=loop.call_soon_threadsafe,
            run_sync_soon_not_threadsafe=loop.call_soon,
            done_callback=done.set_result,
            # asyncio owns the wakeup fd of the main thread's signals.
            host_uses_signal_set_wakeup_fd=True,
        )
        await ready
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._token is not None and self._closing is not None and self._done is not None
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._close)
        (await asyncio.shield(self._done)).unwrap()

    async def _main(self, ready: asyncio.Future[None]) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._closing = trio.Event()
        async with trio.open_nursery() as holders, trio.open_nursery() as calls:
            self._holders, self._calls = holders, calls
            ready.set_result(None)
            await self._closing.wait()
            calls.cancel_scope.cancel()

    def _close(self) -> None:
        """Stop contexts still being entered (an image still indexing), then close."""
        assert self._closing is not None
        for scope in self._entering:
            scope.cancel()
        self._closing.set()

    async def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """``await fn(*args)`` in trio; cancelling the caller cancels the call.

        Raises:
            Whatever *fn* raises; `asyncio.CancelledError` if the portal
            closes first.
        """
        assert self._token is not None and self._calls is not None
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        scope = trio.CancelScope()
        self._token.run_sync_soon(self._calls.start_soon, _call, scope, future, fn, *args)
        try:
            return await future
        except asyncio.CancelledError:
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(scope.cancel)
            raise

    async def enter(self, cm: AbstractAsyncContextManager[T]) -> T:
        """Enter *cm* in trio and keep it open until the portal closes.

        Each context lives in a task of its own, so one that opens a
        nursery or cancel scope is left by the task that entered it, and it
        is left with nothing cancelled (an image's aclose may await).
        Entering is cancelled if the portal closes first (a user quitting
        while an image still indexes).

        Raises:
            Whatever entering raises; `asyncio.CancelledError` if the portal
            closes first.
        """
        assert self._token is not None and self._holders is not None
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._token.run_sync_soon(self._holders.start_soon, self._hold, cm, future)
        return await future

    async def _hold(self, cm: AbstractAsyncContextManager[T], future: asyncio.Future[T]) -> None:
        assert self._closing is not None
        scope = trio.CancelScope()
        self._entering.add(scope)
        try:
            with scope:
                value = await cm.__aenter__()
        except Exception as e:
            _settle(future, outcome.Error(e))
            return
        finally:
            self._entering.discard(scope)
            if scope.cancelled_caught:
                future.cancel()
        if scope.cancelled_caught:
            return
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_exit(cm)
            _settle(future, outcome.Value(value))
            await self._closing.wait()


async def _call(
    scope: trio.CancelScope,
    future: asyncio.Future[T],
    fn: Callable[..., Awaitable[T]],
    *args: Any,
) -> None:
    """One `TrioPortal.run` call: its result or error goes to *future*.

    A cancelled call (the asyncio caller gave up, or the portal closes)
    cancels *future*; trio's own cancellation still propagates.
    """
    try:
        with scope:
            _settle(future, outcome.Value(await fn(*args)))
    except Exception as e:
        _settle(future, outcome.Error(e))
    finally:
        if not future.done():
            future.cancel()


def _settle(future: asyncio.Future[T], result: outcome.Outcome[T]) -> None:
    """Give *future* its result unless its caller stopped waiting."""
    if future.done():
        return
    if isinstance(result, outcome.Value):
        future.set_result(result.value)
    elif isinstance(result, outcome.Error):
        future.set_exception(result.error)
