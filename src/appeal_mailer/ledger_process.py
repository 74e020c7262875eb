"""The ledger on the second core: a `Ledger` served by a child process, called through a socket.

Why a process: a send is bound by one core's Python (rendering, MIME, SMTP),
and the ledger's work (SQL statements, JSON, commits) took its share of that
core under the GIL, even from a thread of its own; worse, a reply that came
back to that thread waited for the GIL held by the busy event loop. In a child
process the ledger runs on the other core, and the event loop reads its
replies like any other socket. Measured: bench/README.md, "Ledger cost".

The calls are `Ledger`'s own methods, named by reference (`Ledger.write_group`)
and typed as such: `call()` blocks, for use outside the event loop; `submit()`
sends the request at once and returns a future, and requests are answered in
the order they were sent (the child serves one at a time), so several may be
in flight: a run prepares the next batch of the list while the child commits
the last one.

Durability is unchanged: a future resolves only once the child has committed,
so "`sending` is durable before DATA" and "`sent` is durable before it is
counted" hold as before. The child ignores SIGINT and SIGTERM: the signal
reaches the whole process group, and the sender, which handles it, still
needs the ledger to record what is in flight. It ends when the sender closes
the socket, or dies: a `kill -9` of the sender closes it, and the child
finishes the commit it is in, starts no other (it checks that its parent is
still the sender before each), and exits. A run's pid in the run log is the sender's
(CampaignRun passes it), so the next run knows at once that a killed run is dead.

Where the OS cannot `fork`, the ledger stays in the sending process and its
calls run on a thread (`LocalLedger`), as they did before this module.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import multiprocessing
import os
import signal
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

from appeal_mailer.errors import AppealMailerError, LedgerError
from appeal_mailer.frames import frame, read_frame, take_frames, write_frame
from appeal_mailer.ledger import Durability, Ledger

P = ParamSpec("P")
T = TypeVar("T")
LedgerCall = Callable[Concatenate[Ledger, P], T]


class LocalLedger:
    """A Ledger in this process; `submit` runs its calls on one thread, in order."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.location = ledger.location
        self._executor: ThreadPoolExecutor | None = None

    def call(self, fn: LedgerCall[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        return fn(self.ledger, *args, **kwargs)

    async def attach(self) -> None:
        """Nothing to do: `submit` starts its thread when first used."""

    def submit(self, fn: LedgerCall[P, T], *args: P.args, **kwargs: P.kwargs) -> asyncio.Future[T]:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="ledger")
        call = functools.partial(fn, self.ledger, *args, **kwargs)
        return asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def detach(self) -> None:
        """The run is over: let the thread go (the ledger stays open)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def close(self) -> None:
        self.ledger.close()


class LedgerProcess:
    """A Ledger in a child process: `call` and `submit` as LocalLedger's, through a socket."""

    def __init__(self, sock: socket.socket, process: Any) -> None:
        self._sock = sock
        self._process = process
        self.location = ""
        # While a run's event loop is attached: the socket's asyncio side.
        self._link: _Link | None = None

    @classmethod
    def open(
        cls,
        url: str,
        *,
        scratch_copy: bool = False,
        durability: Durability = "power",
        campaign: str | None = None,
    ) -> LedgerProcess:
        """Start the child and open the ledger there (`Ledger.open`'s arguments and errors)."""
        # fork, not spawn: the child has every module loaded already and starts in
        # milliseconds. It opens its own database connections after the fork and
        # uses nothing else of the parent's.
        ours, theirs = socket.socketpair()
        options = {"scratch_copy": scratch_copy, "durability": durability, "campaign": campaign}
        process = multiprocessing.get_context("fork").Process(
            target=_serve, args=(theirs, ours, url, options), name="appeal-mailer-ledger"
        )
        process.daemon = True  # never outlives the sender, even one that exits by accident
        process.start()
        theirs.close()  # the child's end: once the child is gone, reads see EOF
        proxy = cls(ours, process)
        try:
            proxy.location = proxy._call_by_name("location", (), {})
        except BaseException:
            proxy.close()
            raise
        return proxy

    def call(self, fn: LedgerCall[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run `fn(ledger, ...)` in the child and return what it returns (blocks)."""
        value: T = self._call_by_name(fn.__name__, args, kwargs)
        return value

    async def attach(self) -> None:
        """A run's event loop starts: from now on `submit`, until `detach`."""
        if self._link is None:
            # A copy of the socket for the event loop to own (and close); `call` keeps
            # the original for what comes after the run.
            _, self._link = await asyncio.get_running_loop().create_unix_connection(
                lambda: _Link(self.location), sock=self._sock.dup()
            )

    def submit(self, fn: LedgerCall[P, T], *args: P.args, **kwargs: P.kwargs) -> asyncio.Future[T]:
        """Send `fn(ledger, ...)` to the child now; the future resolves with its result."""
        if self._link is None:
            raise RuntimeError("LedgerProcess.submit() before attach()")
        future: asyncio.Future[T] = self._link.submit(fn.__name__, args, kwargs)
        return future

    async def detach(self) -> None:
        """The run is over: wait for every reply, and give the socket back to `call`."""
        if self._link is not None:
            link, self._link = self._link, None
            await link.close()
            # The copy shares the original's open file, which the loop made non-blocking.
            self._sock.setblocking(True)

    def close(self) -> None:
        """Ask the child to close the ledger and wait for it to exit."""
        if self._sock.fileno() != -1:
            with contextlib.suppress(LedgerError):  # already gone
                self._call_by_name("close", (), {})
            self._sock.close()
        self._process.join()

    def _call_by_name(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        try:
            write_frame(self._sock, (name, args, kwargs))
            ok, value = read_frame(self._sock)
        except (EOFError, OSError) as exc:
            raise _ended(self.location, exc) from exc
        if not ok:
            raise value
        return value


class _Link(asyncio.Protocol):
    """The socket as the event loop uses it: requests written at once, replies in order."""

    def __init__(self, location: str) -> None:
        self._location = location
        self._transport: asyncio.Transport | None = None
        self._waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._buffer = bytearray()
        self._failed: LedgerError | None = None
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Set while no reply is owed. Futures cannot say so: a cancelled one is done
        # before its reply is read, and that reply would then answer the next call().
        self._drained = asyncio.Event()
        self._drained.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream socket's transport; uvloop's do not subclass asyncio.Transport.
        self._transport = cast(asyncio.Transport, transport)

    def submit(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self._failed is not None or self._transport is None:
            future.set_exception(self._failed or _ended(self._location, EOFError()))
            return future
        # Buffered by the transport, never blocking the loop.
        self._transport.write(frame((name, args, kwargs)))
        self._waiting.append(future)
        self._drained.clear()
        return future

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        for ok, value in take_frames(self._buffer):
            future = self._waiting.popleft()
            if not self._waiting:
                self._drained.set()
            if future.cancelled():
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    def connection_lost(self, exc: Exception | None) -> None:
        self._failed = self._failed or _ended(self._location, exc or EOFError())
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_exception(self._failed)
        self._drained.set()
        if not self._closed.done():
            self._closed.set_result(None)

    async def close(self) -> None:
        # Every reply still owed is read first (the child answers each request, in
        # order), cancelled calls' included: the socket then goes back in step.
        await self._drained.wait()
        if self._transport is not None:
            self._transport.close()
            await self._closed


def open_for_run(
    url: str,
    *,
    scratch_copy: bool = False,
    durability: Durability = "power",
    campaign: str | None = None,
) -> LocalLedger | LedgerProcess:
    """The ledger for a run: in a child process where the OS can fork, else in this one."""
    if "fork" in multiprocessing.get_all_start_methods():
        return LedgerProcess.open(
            url, scratch_copy=scratch_copy, durability=durability, campaign=campaign
        )
    return LocalLedger(
        Ledger.open(url, scratch_copy=scratch_copy, durability=durability, campaign=campaign)
    )


def _serve(
    sock: socket.socket, parents_end: socket.socket, url: str, options: dict[str, Any]
) -> None:
    """The child: open the ledger, then answer calls until the sender closes the socket."""
    sender = os.getppid()
    # See the module's docstring: the sender decides when the run ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parents_end.close()  # or the socket would never see EOF when the sender dies
    ledger: Ledger | None = None
    try:
        ledger = Ledger.open(url, **options)
    except Exception as exc:  # reported to the sender on its first call
        failure = exc
    try:
        while True:
            try:
                name, args, kwargs = read_frame(sock)
            except (EOFError, OSError):
                return  # the sender is gone
            if os.getppid() != sender:
                # The sender died (kill -9) with requests still in the socket: write
                # nothing more for a run that the next run already takes for dead.
                return
            if ledger is None:
                write_frame(sock, (False, _portable(failure, "[ledger]")))
                return
            if name == "close":
                write_frame(sock, (True, None))
                return
            if name == "location":
                write_frame(sock, (True, ledger.location))
                continue
            try:
                value = getattr(Ledger, name)(ledger, *args, **kwargs)
            except Exception as exc:  # every error goes back to the caller, who decides
                write_frame(sock, (False, _portable(exc, ledger.location)))
                continue
            write_frame(sock, (True, value))
    except OSError:
        return  # the sender went away while this answered (a second Ctrl-C, a kill)
    finally:
        if ledger is not None:
            ledger.close()


def _ended(location: str, exc: BaseException) -> LedgerError:
    return LedgerError(
        f"the ledger process ended unexpectedly ({exc.__class__.__name__})",
        location=location or "(opening)",
        hint="the next run recovers what was in flight",
    )


def _portable(exc: Exception, location: str) -> AppealMailerError:
    """`exc` as an error that crosses the socket whole (every AppealMailerError does)."""
    if isinstance(exc, AppealMailerError):
        return exc
    # Anything else is a bug in the ledger's code; its type and message say which.
    return LedgerError(f"internal error in the ledger process: {exc!r}", location=location)
