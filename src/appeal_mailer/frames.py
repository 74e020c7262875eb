"""Messages between a run and its child processes (ledger, DKIM signing): a length, a pickle.

Our own processes write and read these over a socket pair that nothing else
can reach, so a pickle is safe to load here. The child reads with blocking
calls (`read_frame`); the run's event loop takes whole frames from what it has
received (`take_frames`).
"""

from __future__ import annotations

import pickle
import socket
import struct
from collections.abc import Iterator
from typing import Any

_HEADER = struct.Struct("!Q")


def frame(value: Any) -> bytes:
    """`value` as one message: its pickle's length, then the pickle."""
    data = pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


def write_frame(sock: socket.socket, value: Any) -> None:
    sock.sendall(frame(value))


def read_frame(sock: socket.socket) -> Any:
    """The next message on `sock`, waiting for all of it; EOFError once it is closed."""
    (size,) = _HEADER.unpack(_read_exactly(sock, _HEADER.size))
    return pickle.loads(_read_exactly(sock, size))  # noqa: S301  # see the module's docstring


def take_frames(buffer: bytearray) -> Iterator[Any]:
    """Each whole frame at the start of `buffer`, unpickled; each is removed as it is taken."""
    while len(buffer) >= _HEADER.size:
        (size,) = _HEADER.unpack_from(buffer)
        end = _HEADER.size + size
        if len(buffer) < end:
            return
        value = pickle.loads(buffer[_HEADER.size : end])  # noqa: S301  # see the module's docstring
        del buffer[:end]
        yield value


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray(size)
    view = memoryview(data)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise EOFError
        got += n
    return bytes(data)
