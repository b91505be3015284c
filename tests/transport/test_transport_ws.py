"""The WebSocket listener (RFC 7118) over real sockets: ``max_connections`` holds for it too."""

from __future__ import annotations

import asyncio

import pytest
from conftest import Runner, wait_until
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from sipfarm.balancer.websocket import listen_websocket
from sipfarm.sip.address import Address
from sipfarm.transport.config import TransportConfig
from sipfarm.transport.manager import TransportManager


def test_websocket_handshakes_over_max_connections_are_refused(arun: Runner) -> None:
    async def scenario() -> None:
        manager = TransportManager(lambda msg, source, local: None, config=TransportConfig(max_connections=2))
        bound, server = await listen_websocket(manager, Address("ws", "127.0.0.1", 0), None)
        url = f"ws://127.0.0.1:{bound.port}"
        first = await connect(url, subprotocols=["sip"])  # type: ignore[list-item]
        second = await connect(url, subprotocols=["sip"])  # type: ignore[list-item]
        await wait_until(lambda: manager.stats.connections_opened == 2)
        with pytest.raises(InvalidStatus) as refused:
            await connect(url, subprotocols=["sip"])  # type: ignore[list-item]
        assert refused.value.response.status_code == 503
        assert manager.stats.connections_refused == 1
        await first.close()
        await wait_until(lambda: manager.stats.connections_closed == 1)
        third = await connect(url, subprotocols=["sip"])  # type: ignore[list-item]  # room again
        await third.close()
        await second.close()
        server.close()
        await manager.close()

    arun(scenario())


def test_concurrent_handshakes_cannot_overshoot_the_limit(arun: Runner) -> None:
    async def scenario() -> None:
        manager = TransportManager(lambda msg, source, local: None, config=TransportConfig(max_connections=3))
        bound, server = await listen_websocket(manager, Address("ws", "127.0.0.1", 0), None)
        url = f"ws://127.0.0.1:{bound.port}"
        results = await asyncio.gather(
            *(connect(url, subprotocols=["sip"]) for _ in range(10)),  # type: ignore[list-item]
            return_exceptions=True,
        )
        opened = [r for r in results if not isinstance(r, BaseException)]
        await asyncio.sleep(0.2)
        alive = [ws for ws in opened if ws.state.name == "OPEN"]
        assert len(alive) <= 3
        assert manager.stats.connections_refused >= 7
        for ws in opened:
            await ws.close()
        server.close()
        await manager.close()

    arun(scenario())
