"""DKIM's RSA signatures on the second core: a child process signs what the run sends it.

Why a process: an RSA-2048 signature costs 0.3 ms of CPU, more than the rest of
a message's work in the sending process, so signing on the event loop's
thread halves a send. OpenSSL releases the GIL while it signs, but threads did
worse still: measured on the 2-core benchmark machine, 20,000 signed messages
took 13.0 s signed in line, 14.5 s with two signing threads and 15.9 s with
one; each finished signature waited for the GIL held by the busy event loop.
A forked child has its own interpreter and reads nothing but what it is sent.

The run sends the bytes to sign (`Unsigned.signed`) and gets the signatures
back in the same order; what asks in one turn of the event loop goes in one
message. Nothing here is durable: a child that dies fails the signatures not
yet made, the run stops, and their rows stay due. The child ignores SIGINT and
SIGTERM (the run, which handles them, still needs the signatures of what it
finishes) and ends when the run closes the socket or dies.

Where the OS cannot fork, `start` returns None and the run signs in line.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import multiprocessing
import os
import signal
import socket
from typing import Any, cast

from appeal_mailer.dkim import Signer
from appeal_mailer.errors import AppealMailerError
from appeal_mailer.frames import frame, read_frame, take_frames, write_frame

# At most this many signatures asked in one message (5 ms of the child's work).
_BATCH = 16
# How long a closed child may take to exit before it is killed.
_EXIT_SECONDS = 10.0
# Above every descriptor the run can have open, where /proc cannot list them.
_MAX_FD = os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 1 << 16


class SigningProcess:
    """A child process with the campaign's key: `rsa(signed)` resolves to the signature."""

    def __init__(self, process: Any, link: _Link) -> None:
        self._process = process
        self._link = link

    @classmethod
    async def start(cls, signer: Signer) -> SigningProcess | None:
        """Fork the child (it has the key already), or None where the OS cannot fork."""
        if "fork" not in multiprocessing.get_all_start_methods():
            return None
        ours, theirs = socket.socketpair()
        process = multiprocessing.get_context("fork").Process(
            target=_serve, args=(theirs, ours, signer), name="appeal-mailer-dkim"
        )
        process.daemon = True  # never outlives the run, even one that exits by accident
        process.start()
        theirs.close()  # the child's end: once the child is gone, reads see EOF
        try:
            _, link = await asyncio.get_running_loop().create_unix_connection(_Link, sock=ours)
        except BaseException:
            ours.close()
            process.join()
            raise
        return cls(process, link)

    def rsa(self, signed: bytes) -> asyncio.Future[bytes]:
        """The signature of `signed`, as `Signer.rsa` makes it, made by the child."""
        return self._link.ask(signed)

    async def close(self) -> None:
        """Let the child go: it ends when it sees the socket closed."""
        await self._link.close()
        # It finishes the batch it is in (a few milliseconds) and exits; one that
        # does not (stopped, say) is killed rather than waited for. Not with
        # join(timeout): the child closed its copy of multiprocessing's sentinel
        # pipe (_serve), and join(timeout) then blocks as join() does.
        joined = asyncio.get_running_loop().run_in_executor(None, self._process.join)
        try:
            await asyncio.wait_for(asyncio.shield(joined), _EXIT_SECONDS)
        except TimeoutError:
            self._process.kill()
            await joined


class _Link(asyncio.Protocol):
    """The run's end of the socket: what is asked in one turn goes in one message."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._asked: list[tuple[bytes, asyncio.Future[bytes]]] = []
        self._waiting: collections.deque[list[asyncio.Future[bytes]]] = collections.deque()
        self._buffer = bytearray()
        self._failed: AppealMailerError | None = None
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream socket's transport; uvloop's do not subclass asyncio.Transport.
        self._transport = cast(asyncio.Transport, transport)

    def ask(self, signed: bytes) -> asyncio.Future[bytes]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes] = loop.create_future()
        if self._failed is not None:
            future.set_exception(self._failed)
            return future
        if not self._asked:
            loop.call_soon(self._send)
        self._asked.append((signed, future))
        if len(self._asked) >= _BATCH:
            # Sent now, not at the end of the turn: the child signs these while the
            # run prepares the next ones, instead of the two taking turns.
            self._send()
        return future

    def _send(self) -> None:
        asked, self._asked = self._asked, []
        if not asked:  # sent already, a full batch
            return
        if self._failed is not None or self._transport is None:
            for _, future in asked:
                if not future.done():
                    future.set_exception(self._failed or _ended(EOFError()))
            return
        # Buffered by the transport, never blocking the loop.
        self._transport.write(frame([signed for signed, _ in asked]))
        self._waiting.append([future for _, future in asked])

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        for signatures in take_frames(self._buffer):
            for future, signature in zip(self._waiting.popleft(), signatures, strict=True):
                if not future.done():  # a run that stops cancels what it no longer needs
                    future.set_result(signature)

    def connection_lost(self, exc: Exception | None) -> None:
        self._failed = self._failed or _ended(exc or EOFError())
        while self._waiting:
            for future in self._waiting.popleft():
                if not future.done():
                    future.set_exception(self._failed)
        if not self._closed.done():
            self._closed.set_result(None)

    async def close(self) -> None:
        # abort, not close: close waits until what is buffered is written, and a
        # child that no longer reads (stopped, stuck) would hold the run for ever.
        # Signatures still asked are not needed any more.
        if self._transport is not None and not self._transport.is_closing():
            self._transport.abort()
        await self._closed


def _serve(sock: socket.socket, parents_end: socket.socket, signer: Signer) -> None:
    """The child: sign each batch the run sends, in order, until the socket closes."""
    status = 1  # a failure of its own: the run sees the socket close, and stops
    try:
        # See the module's docstring: the run decides when signing ends.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        # The event loop's: a signal here must not wake the run's loop.
        signal.set_wakeup_fd(-1)
        parents_end.close()  # or the socket would never see EOF when the run dies
        _close_inherited(keep=sock.fileno())
        with contextlib.suppress(EOFError, OSError):  # the run is gone, or done
            while True:
                batch: list[bytes] = read_frame(sock)
                write_frame(sock, [signer.rsa(signed) for signed in batch])
        status = 0
    finally:
        # Out at once, whatever happened: a normal exit would flush this copy of the
        # run's stdout buffer, and print again what the run had printed but not yet
        # flushed when it forked.
        os._exit(status)


def _close_inherited(keep: int) -> None:
    """Close every descriptor but `keep` and the standard streams.

    Not the ledger's socket (its child must see EOF when the run dies), not an
    SMTP session's, not the event loop's. The open ones are listed in /proc
    where there is one: os.closerange up to the limit of open files costs one
    close() per possible descriptor where CPython was built without
    close_range(2), about 95 s for a container's limit of 2**30.
    """
    try:
        open_fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:  # no /proc: every possible one
        os.closerange(3, keep)
        os.closerange(keep + 1, _MAX_FD)
        return
    for fd in open_fds:
        if fd > 2 and fd != keep:  # listdir's own is closed already: EBADF
            with contextlib.suppress(OSError):
                os.close(fd)


def _ended(exc: BaseException) -> AppealMailerError:
    return AppealMailerError(
        f"the DKIM signing process ended unexpectedly ({exc.__class__.__name__})",
        hint="run the same command again: the messages not sent are still due",
    )
