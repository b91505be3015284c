"""Fixtures for the real-socket transport tests (127.0.0.1 only, every wait bounded).

Async scenarios run through ``arun`` on both the default asyncio loop and uvloop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop

from sipfarm.sip.address import Address
from sipfarm.sip.message import SipMessage, make_response
from sipfarm.sip.via import response_target
from sipfarm.transport.manager import TransportManager
from sipfarm.transport.tls import make_self_signed_cert

Runner = Callable[..., Any]


@pytest.fixture(params=["asyncio", "uvloop"])
def arun(request: pytest.FixtureRequest) -> Runner:
    factory = uvloop.new_event_loop if request.param == "uvloop" else None

    def run(coro: Coroutine[Any, Any, Any], timeout: float = 10.0) -> Any:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(asyncio.wait_for(coro, timeout))

    return run


@pytest.fixture(scope="session")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_self_signed_cert(tmp_path_factory.mktemp("tls"))


def sip_request(
    *,
    call_id: str = "call-1@test",
    via: str = "SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-1;rport",
    method: str = "OPTIONS",
    cseq_method: str | None = None,
    body: bytes = b"",
    content_length: int | None = None,
) -> bytes:
    clen = len(body) if content_length is None else content_length
    head = (
        f"{method} sip:svc@127.0.0.1 SIP/2.0\r\n"
        f"Via: {via}\r\n"
        "Max-Forwards: 70\r\n"
        "From: <sip:alice@test>;tag=a1\r\n"
        "To: <sip:svc@test>\r\n"
        f"Call-ID: {call_id}\r\n"
        f"CSeq: 1 {cseq_method or method}\r\n"
        f"Content-Length: {clen}\r\n"
        "\r\n"
    )
    return head.encode() + body


class Uas:
    """A callback that records what it sees and answers requests with 200 (or raises)."""

    def __init__(self, *, answer: bool = True) -> None:
        self.answer = answer
        self.seen: list[tuple[SipMessage, Address, Address]] = []
        self.raise_for: dict[str, BaseException] = {}  # Call-ID -> exception to raise
        self.manager: TransportManager | None = None

    def __call__(self, msg: SipMessage, source: Address, local: Address) -> None:
        self.seen.append((msg, source, local))
        exc = self.raise_for.get(msg.call_id.decode())
        if exc is not None:
            raise exc
        if self.answer and msg.is_request and msg.method != b"ACK" and self.manager is not None:
            response = make_response(msg, 200, to_tag=b"uas")
            self.manager.send(response.to_bytes(), response_target(response, source), local=local)


async def wait_until(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


class UdpClient(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.put_nowait((data, addr))

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])

    def send(self, data: bytes, dest: Address) -> None:
        assert self.transport is not None
        self.transport.sendto(data, (dest.host, dest.port))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def recv(self, timeout: float = 3.0) -> bytes:
        data, _ = await asyncio.wait_for(self.received.get(), timeout)
        return data


async def udp_client() -> UdpClient:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_datagram_endpoint(UdpClient, local_addr=("127.0.0.1", 0))
    return client


async def read_message(reader: asyncio.StreamReader, timeout: float = 3.0) -> bytes:
    """One Content-Length framed message from a stream."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() in (b"content-length", b"l"):
            length = int(value)
    body = await asyncio.wait_for(reader.readexactly(length), timeout) if length else b""
    return head + body
