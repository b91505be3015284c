"""TLS contexts for SIP over TLS (RFC 3261 26.3.1, RFC 5922), and test certificates."""

from __future__ import annotations

import ipaddress
import ssl
import subprocess
from collections.abc import Sequence
from pathlib import Path


def server_context(certfile: str | Path, keyfile: str | Path) -> ssl.SSLContext:
    """A server context presenting ``certfile``; TLS 1.2 or later, no client certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile, keyfile)
    return context


def client_context(cafile: str | Path | None = None) -> ssl.SSLContext:
    """A verifying client context: the system CAs, or only ``cafile`` when given."""
    context = ssl.create_default_context(cafile=str(cafile) if cafile is not None else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def make_self_signed_cert(
    directory: str | Path,
    *,
    common_name: str = "localhost",
    ip: str = "127.0.0.1",
    dns_names: Sequence[str] = (),
) -> tuple[Path, Path]:
    """Write a self-signed certificate and key (P-256, one day) with the ``openssl`` CLI.

    For tests and development: the certificate names ``common_name``, ``dns_names`` and ``ip``
    in its subjectAltName, so a client verifying against it (``client_context(cert)``) accepts
    it. A name that is an IP literal goes in as an IP entry. Returns (certificate path, key path).
    """
    out = Path(directory)
    cert, key = out / "cert.pem", out / "key.pem"
    sans: list[str] = []
    for name in (common_name, *dns_names, ip):
        entry = f"IP:{name}" if _ip_literal(name) else f"DNS:{name}"
        if entry not in sans:
            sans.append(entry)
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            f"/CN={common_name}",
            "-addext",
            "subjectAltName=" + ",".join(sans),
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return cert, key


def _ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True
