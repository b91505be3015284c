"""The loopback wire as tests see it: a raw ``AF_PACKET`` socket on ``lo`` (root, which the
loopback-only namespace tests have; no tcpdump needed) keeping every UDP and TCP packet with a
payload to or from one port."""

from __future__ import annotations

import ipaddress
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4  # lo shows every packet twice: as sent (this) and as received


@dataclass(frozen=True)
class Packet:
    t: float
    proto: str  # "udp" or "tcp"
    src: tuple[str, int]
    dst: tuple[str, int]
    payload: bytes


class LoopbackCapture:
    """Every UDP and TCP packet with a payload to or from ``port`` on ``lo``, as it crossed it
    (a raw AF_PACKET socket: root, which the namespace tests have)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.packets: list[Packet] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(ETH_P_ALL))
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self._sock.bind(("lo", 0))
        self._sock.settimeout(0.2)
        self._thread = threading.Thread(target=self._run, name="lo-capture", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                frame, where = self._sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if where[2] == PACKET_OUTGOING:
                continue
            packet = self._parse(frame)
            if packet is not None and self.port in (packet.src[1], packet.dst[1]):
                with self._lock:
                    self.packets.append(packet)

    @staticmethod
    def _parse(frame: bytes) -> Packet | None:
        if len(frame) < 34 or frame[12:14] != b"\x08\x00":  # Ethernet (lo's) + IPv4
            return None
        ip = frame[14:]
        ihl = (ip[0] & 0x0F) * 4
        total = struct.unpack("!H", ip[2:4])[0]
        src_ip, dst_ip = str(ipaddress.IPv4Address(ip[12:16])), str(ipaddress.IPv4Address(ip[16:20]))
        body = ip[ihl:total]
        if ip[9] == socket.IPPROTO_UDP:
            proto, payload = "udp", body[8:]
        elif ip[9] == socket.IPPROTO_TCP:
            proto, payload = "tcp", body[(body[12] >> 4) * 4 :]
        else:
            return None
        if not payload:
            return None
        sport, dport = struct.unpack("!HH", body[:4])
        return Packet(time.monotonic(), proto, (src_ip, sport), (dst_ip, dport), payload)

    def snapshot(self) -> list[Packet]:
        with self._lock:
            return list(self.packets)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()


@contextmanager
def capture(port: int) -> Iterator[LoopbackCapture]:
    cap = LoopbackCapture(port)
    try:
        yield cap
    finally:
        cap.close()
