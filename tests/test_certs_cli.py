"""``ferrotunnel certs`` as a subprocess: a CA in the folder is reused (a running server keeps
working), only the asked-for pair is written, nothing is overwritten without --force, and the
wildcard pair for --domain serves ``*.DOMAIN`` over real TLS."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys

from cryptography import x509

from ferrotunnel import tls


def certs(*args):
    return subprocess.run([sys.executable, "-m", "ferrotunnel", "certs", *args], capture_output=True, text=True,
                          timeout=60)


def signed_by(cert_path, ca_path) -> bool:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    try:
        cert.verify_directly_issued_by(ca)
        return True
    except (ValueError, TypeError):
        return False


def test_the_ca_is_reused_and_nothing_is_overwritten_without_force(tmp_path):
    d = tmp_path / "certs"
    first = certs("--out", str(d))
    assert first.returncode == 0, first.stderr
    assert sorted(p.name for p in d.iterdir()) == ["ca.key", "ca.pem", "server.key", "server.pem"]
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    again = certs("--out", str(d))
    assert again.returncode == 1
    assert "server.pem" in again.stderr and "--force" in again.stderr and "Traceback" not in again.stderr
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before  # untouched
    client = certs("--out", str(d), "--client")
    assert client.returncode == 0, client.stderr
    assert "the CA already in" in client.stdout
    after = {p.name: p.read_bytes() for p in d.iterdir()}
    assert {k: after[k] for k in before} == before  # the CA and the server pair the server uses stay
    assert signed_by(d / "client.pem", d / "ca.pem")
    forced = certs("--out", str(d), "--force")
    assert forced.returncode == 0, forced.stderr
    assert (d / "ca.pem").read_bytes() == before["ca.pem"] and (d / "server.pem").read_bytes() != before["server.pem"]
    assert signed_by(d / "server.pem", d / "ca.pem")
    assert certs("--out", str(d), "--days", "0").returncode == 2


def test_the_wildcard_pair_serves_any_name_under_the_domain(tmp_path):
    d = tmp_path / "certs"
    assert certs("--out", str(d)).returncode == 0
    made = certs("--out", str(d), "--domain", "Example.Test")
    assert made.returncode == 0, made.stderr
    assert "wildcard certificate valid for *.example.test and example.test" in made.stdout
    assert signed_by(d / "wildcard.pem", d / "ca.pem")
    cert = x509.load_pem_x509_certificate((d / "wildcard.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert sans == ["*.example.test", "example.test"]

    async def handshake(name: str) -> bool:
        server_ctx = tls.server_context(d / "wildcard.pem", d / "wildcard.key")
        srv = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=server_ctx)
        port = srv.sockets[0].getsockname()[1]
        try:
            _r, w = await asyncio.wait_for(asyncio.open_connection(
                "127.0.0.1", port, ssl=tls.client_context(d / "ca.pem"), server_hostname=name), 10)
            w.close()
            return True
        except ssl.SSLCertVerificationError:
            return False
        finally:
            srv.close()

    assert asyncio.run(handshake("web.example.test"))
    assert asyncio.run(handshake("example.test"))
    assert not asyncio.run(handshake("a.b.example.test"))  # a wildcard covers one label only
    assert not asyncio.run(handshake("web.other.test"))
