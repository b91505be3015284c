"""The relay's media plane: every port's sockets on one ``select.epoll``, drained in batches.

Theory of operation
-------------------
asyncio's (and uvloop's) datagram protocol costs a Python callback per datagram with a source
address turned into a ``(host, port)`` tuple, and its ``sendto`` parses that tuple back; a bare
uvloop forwarder with no counters reached 0.79x the packets per CPU-second of rtpengine
(userspace).  This module takes the packet path off the event loop's datagram machinery:

- every port's socket is registered (level-triggered, ``EPOLLIN``) with one epoll object of the
  plane, whose own file descriptor the event loop watches (``loop.add_reader``): one loop
  callback (:meth:`MediaPlane.drain`) serves every socket that is ready, a bounded number of
  events at a time so that ng commands and timers are never starved;
- a ready socket is read ``recvfrom`` by ``recvfrom`` and each datagram handed to
  :meth:`RelayPort.receive <media.port.RelayPort.receive>`, which forwards, drops and counts
  exactly as before.  How many datagrams are read from one socket in a row adapts to its rate
  (:meth:`MediaPlane.drain`): one at a time for the many streams of ordinary calls (no empty
  read, whose ``BlockingIOError`` costs as much as a datagram), up to :data:`MAX_BURST` for a
  hot stream (one epoll event for many datagrams);
- **links**: once a port has latched (its party's real address is known), the plane opens a
  second socket on the same local address and port, ``connect``-ed to that source, and gives
  its ``send`` to the core as ``port.link``.  The kernel delivers a connected UDP socket's packets
  to it in preference to the unconnected one (it matches more of the 4-tuple), so the party's packets
  arrive there and are read with ``recv`` (no source address to build: it is the link's), and
  the packets the relay sends to that party go out through ``link.send`` (no address to parse,
  the route cached in the socket).  Packets from anyone else still arrive on the port's own
  socket and take the general path (latching, re-latch proof, ``drops_unexpected_source``).

The two sockets share the port by ``SO_REUSEADDR``, set on both only while the link is bound
and cleared right after, so another process can no more bind the port than before (a bind
conflicts with a socket whose ``SO_REUSEADDR`` is off).  The core drops ``port.link`` whenever
the port's source changes (re-latch, new SDP, freed port); the plane then links it again, to
the new source, after the batch that latched it.  A link's datagram always counts as coming
from the address it is connected to, so a packet read from a link that is no longer the port's
source is judged like any other stranger's.

**The fast path** (``media/_fastpath.c``, a C extension built with the compiled build; the
interpreted build has none and does it all here): a :class:`~media._fastpath.LinkTable` does the
epoll_wait, and for each ready link of a port it has *loaded* reads, checks, counts and forwards
the common case (RTP of the counted SSRC, in sequence, to the peer's current link) exactly as
:meth:`RelayPort.receive <media.port.RelayPort.receive>`'s first branch, with no Python object
per packet; it hands back to this module every other ready socket and the first uncommon
datagram of a link.  While loaded, the table owns the port's counters and RTP statistics (the
RelayPort's copies are stale): the plane unloads a port (the table writes them back) before any
Python code handles its datagrams, :meth:`MediaPlane.reclaim` before signalling changes it, and
:meth:`MediaPlane.flush` before anything reads counters (query, totals, the media timeout).
After Python handled a port, :meth:`MediaPlane._settle` tells the table whether its link is
still current and loads it again.  The C file's comment has the rules.

The clock, the counters and the forwarding rules are the core's (:mod:`media.relay`); nothing
here knows RTP (the fast path mirrors the core's common case).
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final

from media.port import KIND_RTCP, Link, RelayPort

if TYPE_CHECKING:
    from media._fastpath import LinkTable

__all__ = ["MAX_BURST", "MAX_EVENTS", "MediaPlane"]

#: ready sockets handled per :meth:`MediaPlane.drain` (the loop's other work runs in between)
MAX_EVENTS: Final = 256
#: most datagrams read from one ready socket in a row (see the module docstring)
MAX_BURST: Final = 256
#: most datagrams read from a port's own socket when it gets a link (a queue of 1 MB is ~1,300)
MAX_FLUSH: Final = 4096
RECV_SIZE: Final = 65536  # a whole UDP datagram: never truncate what is forwarded

Addr = tuple[Any, ...]


class _PortSockets:
    """One port's socket and, once it has latched, its link."""

    __slots__ = (
        "burst",
        "link",
        "link_addr",
        "link_failed",
        "link_fd",
        "link_recv",
        "link_send",
        "polled",
        "port",
        "recvfrom",
        "sock",
        "target",
    )

    def __init__(self, port: RelayPort, sock: socket.socket) -> None:
        self.port = port
        self.sock = sock
        self.burst = 1  # datagrams to read at its next readiness
        self.polled = -1  # the poll that last reported one of its sockets
        self.link: socket.socket | None = None
        self.link_fd = -1
        self.link_send: Link | None = None  # link.send, bound once: the port's ``link``
        self.link_recv: Callable[[int], bytes] | None = None  # link.recv (bound once, as below)
        self.recvfrom: Callable[[int], tuple[bytes, Addr]] = sock.recvfrom
        self.link_addr: Addr | None = None
        self.link_failed: Addr | None = None  # the source a link could not be opened to
        # the address the fast path sends to through ``sock`` for this port's peer, while the
        # port has no link (see _target); None: ``sock`` is not registered there
        self.target: Addr | None = None


def fast_path_available() -> bool:
    """Whether the C fast path is importable (the compiled build has it)."""
    try:
        import media._fastpath  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def _link_table(epoll_fd: int) -> LinkTable | None:
    try:
        from media._fastpath import LinkTable  # noqa: PLC0415
    except ImportError:  # the interpreted build: the Python path does it all
        return None
    return LinkTable(epoll_fd)


class MediaPlane:
    """The sockets of the relay's ports on ``host`` (see the module docstring).

    ``clock`` (the engine's) times the datagrams the fast path forwards, once per drain;
    ``fast_path`` False keeps every datagram on the Python path even when the C extension is
    there (:attr:`fast` says which runs)."""

    def __init__(
        self,
        host: str,
        receive_buffer: int | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        fast_path: bool = True,
    ) -> None:
        self.host = host
        self.family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.receive_buffer = receive_buffer
        self._clock = clock
        self._epoll = select.epoll()
        self._by_fd: dict[int, _PortSockets] = {}  # both sockets of a port: the same entry
        self._ports: dict[RelayPort, _PortSockets] = {}
        self.links_failed = 0
        self._polls = 0
        self._closed = False
        self._fast: LinkTable | None = _link_table(self._epoll.fileno()) if fast_path else None
        self._handback: list[Any] = []  # what the fast path leaves to Python, per drain
        self._closed_fds: set[int] = set()  # sockets closed since the drain began (see drain)

    @property
    def fast(self) -> bool:
        """Whether the C fast path forwards the linked ports' common case."""
        return self._fast is not None

    @property
    def fast_ports(self) -> int:
        """Ports whose counters the fast path holds now (it forwards their common case)."""
        fast = self._fast
        if fast is None:
            return 0
        return sum(1 for entry in self._ports.values() if entry.link_fd >= 0 and fast.loaded(entry.link_fd))

    def fileno(self) -> int:
        """The epoll's descriptor: readable when a port's socket is (watch it with add_reader)."""
        return self._epoll.fileno()

    def __len__(self) -> int:
        return len(self._ports)

    @property
    def linked(self) -> int:
        return sum(1 for port in self._ports if port.link is not None)

    def ports(self) -> list[RelayPort]:
        return list(self._ports)

    def bind(self, port: RelayPort) -> None:
        """Bind ``port`` on the plane's host; OSError if another socket holds it."""
        sock = self._socket()
        try:
            sock.bind((self.host, port.port))
        except OSError:
            sock.close()
            raise
        entry = _PortSockets(port, sock)
        fd = sock.fileno()
        self._epoll.register(fd, select.EPOLLIN)
        self._by_fd[fd] = entry
        self._ports[port] = entry
        port.sender = sock

    def unbind(self, port: RelayPort) -> bool:
        """Close ``port``'s sockets (the core has dropped its sender and link); False if none."""
        entry = self._ports.pop(port, None)
        if entry is None:
            return False
        self._unlink(entry)
        if self._fast is not None and entry.target is not None:
            entry.target = None
            self._fast.remove(entry.sock.fileno())
        self._forget(entry.sock)
        return True

    def close(self) -> None:
        for port in list(self._ports):
            self.unbind(port)
        self._closed = True
        if self._fast is not None:
            self._fast.close()
        self._epoll.close()

    # -- counter ownership with the fast path (see the module docstring) --------------------

    def reclaim(self, ports: Iterable[RelayPort]) -> None:
        """Give ``ports``' counters back to Python before signalling reads or changes them."""
        fast = self._fast
        if fast is None:
            return
        for port in ports:
            entry = self._ports.get(port)
            if entry is not None and entry.link_fd >= 0:
                fast.unload(entry.link_fd)

    def refresh(self, ports: Iterable[RelayPort]) -> None:
        """After signalling changed ``ports``: tell the fast path which links are still theirs."""
        fast = self._fast
        if fast is None:
            return
        for port in ports:
            entry = self._ports.get(port)
            if entry is not None:
                self._check(entry)

    def _check(self, entry: _PortSockets) -> None:
        """Tell the fast path whether ``entry``'s link, and its socket as a target, still
        stand for its port (only Python code changes a port: after it ran)."""
        fast = self._fast
        assert fast is not None
        port = entry.port
        if entry.link_fd >= 0:
            if port.link is entry.link_send:
                fast.set_current(entry.link_fd)
            else:
                fast.retire(entry.link_fd)
        if entry.target is not None:
            if port.link is None and port.dest == entry.target and not port.closed:
                fast.set_current(entry.sock.fileno())
            else:
                fast.retire(entry.sock.fileno())

    def flush(self, ports: Iterable[RelayPort] | None = None) -> None:
        """Write the fast path's counters back into ``ports`` (every port: None) for reading."""
        fast = self._fast
        if fast is None:
            return
        if ports is None:
            fast.flush_all()
            return
        for port in ports:
            entry = self._ports.get(port)
            if entry is not None and entry.link_fd >= 0:
                fast.flush(entry.link_fd)

    # -- the packet path -------------------------------------------------------------------

    def drain(self) -> int:
        """Read the ready sockets (at most MAX_EVENTS of them) and hand every datagram to its
        port; returns how many sockets were ready (MAX_EVENTS: more may be).

        How many datagrams to read from a ready socket adapts per port: one while it has one
        datagram per poll (the next read would only raise BlockingIOError, the costliest part of
        an empty read), twice as many each time it is ready in two polls running, half as many
        after a read found it empty.  Level-triggered: what is left (sockets beyond MAX_EVENTS,
        datagrams beyond a burst) keeps this epoll readable, so the event loop calls again.
        With the fast path, the C table polls and forwards the loaded links' common case (same
        burst rule); this reads what it hands back."""
        if self._closed:  # the relay stopped
            return 0
        self._polls += 1
        poll = self._polls
        fast = self._fast
        if fast is None:
            events = self._epoll.poll(0, MAX_EVENTS)
            for fd, _mask in events:
                self._serve(fd, poll)
            return len(events)
        handback = self._handback
        closed = self._closed_fds
        closed.clear()  # closed between drains: their events are not in this batch
        try:
            ready = fast.drain(self._clock(), handback)
            for item in handback:
                # an item whose socket an earlier item closed (its number may already name a
                # new socket, e.g. the same port's new link): it was the closed socket's
                fd = item if isinstance(item, int) else item[0]
                if closed and fd in closed:
                    continue
                if isinstance(item, int):
                    self._serve(item, poll)
                else:  # the first datagram of a loaded link that is not the common case
                    entry = self._by_fd.get(fd)
                    if entry is not None and entry.link_addr is not None:
                        entry.port.receive(item[1], entry.link_addr)
                        self._settle(entry)
        finally:
            handback.clear()
            closed.clear()
        return ready

    def _serve(self, fd: int, poll: int) -> None:
        """Read one ready socket on the Python path."""
        entry = self._by_fd.get(fd)
        if entry is None:  # closed by an earlier datagram's consequences in this batch
            return
        burst = entry.burst
        if entry.polled == poll - 1 and burst < MAX_BURST:
            burst *= 2
        entry.polled = poll
        port = entry.port
        read = 0
        if fd == entry.link_fd:
            recv = entry.link_recv
            source = entry.link_addr
            assert recv is not None and source is not None
            while read < burst:
                try:
                    data = recv(RECV_SIZE)
                except OSError:  # empty (BlockingIOError), or an ICMP error reported on a link
                    break
                read += 1
                port.receive(data, source)
        else:
            if self._fast is not None and entry.link_fd >= 0:
                self._fast.unload(entry.link_fd)  # a stranger, or a packet from before the link
            recvfrom = entry.recvfrom
            while read < burst:
                try:
                    data, addr = recvfrom(RECV_SIZE)
                except OSError:
                    break
                read += 1
                port.receive(data, addr)
        entry.burst = burst if read == burst else max(1, burst >> 1)
        self._settle(entry)

    def _settle(self, entry: _PortSockets) -> None:
        """Python handled datagrams of ``entry``'s port: link it if it latched; with the fast
        path, say whether its link is still its own and let the table take it over again."""
        port = entry.port
        if port.link is None and port.source is not None:
            self._relink(entry)
        fast = self._fast
        if fast is None:
            return
        self._check(entry)
        if entry.link_fd < 0 or port.link is not entry.link_send:
            return
        out = port.peer_rtp
        out_entry = self._ports.get(out)
        if out_entry is None or out.closed:
            return
        if out.link is not None:
            if out_entry.link_fd >= 0 and out.link is out_entry.link_send:
                fast.load(entry.link_fd, out_entry.link_fd)
            return
        # the peer has not latched (a one-way stream): it sends from its own socket to its
        # SDP address, as RelayPort.receive does through ``out.sender``
        dest = out.dest
        if dest is None or out.sender is not out_entry.sock:
            return
        fd = out_entry.sock.fileno()
        if fast.target(fd, out, dest):
            out_entry.target = dest
            fast.load(entry.link_fd, fd)

    # -- links -----------------------------------------------------------------------------

    def _relink(self, entry: _PortSockets) -> None:
        """The port has latched (again) and has no link: give it one connected to its source."""
        port = entry.port
        source = port.source
        if source is None or port.closed or port.kind == KIND_RTCP or source[1] == 0:
            return
        if entry.link is not None and entry.link_addr == source:
            port.link = entry.link_send  # unlatched and latched again to the same address
            return
        if source is entry.link_failed:
            return
        self._unlink(entry)
        link = self._socket()
        try:
            # both sockets share the port only while the link binds (see the module docstring)
            entry.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            link.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                link.bind(entry.sock.getsockname())
            finally:
                entry.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
                link.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
            link.connect(source)
        except OSError:
            # the port keeps working through its own socket, as before links existed
            link.close()
            entry.link_failed = source
            self.links_failed += 1
            return
        fd = link.fileno()
        self._epoll.register(fd, select.EPOLLIN)
        self._by_fd[fd] = entry
        if self._fast is not None:
            self._fast.register(fd, port)
        entry.link = link
        entry.link_fd = fd
        entry.link_addr = source
        entry.link_send = port.link = link.send
        entry.link_recv = link.recv
        # what the port's own socket holds arrived before the link existed: forward it now, so
        # that the party's packets keep their order (the link's come after)
        sock = entry.sock
        for _ in range(MAX_FLUSH):
            try:
                data, addr = sock.recvfrom(RECV_SIZE)
            except OSError:
                break
            port.receive(data, addr)

    def _unlink(self, entry: _PortSockets) -> None:
        link = entry.link
        if link is not None:
            if self._fast is not None:
                self._fast.remove(entry.link_fd)  # writes the port's counters back
            entry.link = None
            entry.link_fd = -1
            entry.link_addr = None
            if entry.port.link is entry.link_send:
                entry.port.link = None
            entry.link_send = None
            entry.link_recv = None
            self._forget(link)

    def _forget(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        if fd >= 0:
            if self._fast is not None:
                self._closed_fds.add(fd)
            self._by_fd.pop(fd, None)
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):  # closed epoll (the relay stops), or never registered
                pass
        sock.close()

    def _socket(self) -> socket.socket:
        sock = socket.socket(self.family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            if self.receive_buffer:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)
        except OSError:
            sock.close()
            raise
        return sock
