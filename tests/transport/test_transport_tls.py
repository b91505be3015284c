"""TLS flows (server and outbound client side) with a self-signed certificate."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

from conftest import Runner, Uas, read_message, sip_request, wait_until

from sipfarm.sip.address import Address
from sipfarm.sip.message import SipMessage
from sipfarm.sip.parser import parse_message
from sipfarm.transport.manager import TransportManager
from sipfarm.transport.tls import client_context, server_context
from sipfarm.up import entry_certificate

TLS_VIA = "SIP/2.0/TLS 127.0.0.1:5071;branch=z9hG4bK-1;rport"


def test_tls_round_trip_between_two_managers(arun: Runner, tls_cert: tuple[Path, Path]) -> None:
    cert, key = tls_cert

    async def scenario() -> None:
        uas = Uas()
        server = TransportManager(uas)
        uas.manager = server
        addr = await server.listen("tls:127.0.0.1:0", ssl=server_context(cert, key))
        answers: list[tuple[SipMessage, Address]] = []
        client = TransportManager(
            lambda msg, source, local: answers.append((msg, source)),
            tls_client_context=client_context(cert),  # verifies the certificate and its IP
        )
        assert client.send(sip_request(via=TLS_VIA), addr)
        await wait_until(lambda: len(answers) == 1)
        response, source = answers[0]
        assert response.status == 200 and source == addr
        assert server.stats.received["tls"] == 1 and client.stats.received["tls"] == 1
        await client.close()
        await server.close()

    arun(scenario())


def test_tls_ping_and_request_from_a_plain_client(arun: Runner, tls_cert: tuple[Path, Path]) -> None:
    cert, key = tls_cert

    async def scenario() -> None:
        uas = Uas()
        server = TransportManager(uas)
        uas.manager = server
        addr = await server.listen("tls:127.0.0.1:0", ssl=server_context(cert, key))
        reader, writer = await asyncio.open_connection(addr.host, addr.port, ssl=client_context(cert))
        writer.write(b"\r\n\r\n")
        assert await asyncio.wait_for(reader.readexactly(2), 3) == b"\r\n"
        writer.write(sip_request(via=TLS_VIA))
        assert parse_message(await read_message(reader)).status == 200
        assert uas.seen[0][1].transport == "tls"
        writer.close()
        await server.close()

    arun(scenario())


def test_untrusted_server_certificate_fails_the_connect(arun: Runner, tls_cert: tuple[Path, Path]) -> None:
    cert, key = tls_cert

    async def scenario() -> None:
        server = TransportManager(Uas())
        addr = await server.listen("tls:127.0.0.1:0", ssl=server_context(cert, key))
        client = TransportManager(Uas(), tls_client_context=client_context())  # system CAs only
        assert client.send(sip_request(via=TLS_VIA), addr)
        await wait_until(lambda: client.stats.connect_failures == 1)
        assert client.stats.dropped == 1
        assert server.stats.received["tls"] == 0
        await client.close()
        await server.close()

    arun(scenario())


def _subject_and_sans(cert: Path) -> tuple[str, set[str]]:
    """The certificate's subject line and subjectAltName entries, as ``openssl x509`` prints them."""
    text = subprocess.run(
        ["openssl", "x509", "-in", str(cert), "-noout", "-subject", "-ext", "subjectAltName"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    subject, _, rest = text.partition("\n")
    sans = rest.split("Subject Alternative Name:")[1].strip()
    return subject.replace(" ", ""), {entry.strip() for entry in sans.split(",")}


def test_up_certificate_names_the_sip_domain_localhost_and_the_host(tmp_path: Path) -> None:
    """RFC 5922 7.1: the SIP domain is what a client checks (linphone's mbedTLS ignores IP
    entries); localhost and the host's address stay."""
    cert, _ = entry_certificate(tmp_path, "farm.test", "192.0.2.10")
    subject, sans = _subject_and_sans(cert)
    assert subject == "subject=CN=farm.test"
    assert sans == {"DNS:farm.test", "DNS:localhost", "IP Address:192.0.2.10"}
    # a farm whose domain is its IP: an IP entry, never a DNS one
    cert, _ = entry_certificate(tmp_path, "192.0.2.10", "192.0.2.10")
    assert _subject_and_sans(cert)[1] == {"DNS:localhost", "IP Address:192.0.2.10"}
