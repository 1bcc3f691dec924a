"""TLS interop with rustls, the TLS stack of the Rust FerroTunnel: a small rustls 0.20 peer
(tests/rustls_probe) built with cargo from Debian's packaged crates (librust-rustls-dev,
librust-rustls-pemfile-dev; `.ci/run` installs them). It verifies certificates with webpki, which
is stricter than OpenSSL in places (it wants a SAN, a CA distinct from the leaf, an end-entity
leaf), so these tests also check what `ferrotunnel certs` writes. Skipped when cargo or the
packaged crates are missing."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

import ferrotunnel as ft
from ferrotunnel import frames as F

ROOT = Path(__file__).resolve().parent.parent
PROBE_SRC = ROOT / "tests" / "rustls_probe"
TARGET = ROOT / "build" / "rustls-probe"
REGISTRY = Path("/usr/share/cargo/registry")
# PROTOCOL.md 2.8 g: the Rust client's handshake with token "secret", no tunnel id
RUST_HANDSHAKE = "0000001700" "00" "06736563726574" "00" "01" "01" "02" "056261736963" "03746370"


def _cargo():
    found = shutil.which("cargo") or str(Path.home() / ".cargo" / "bin" / "cargo")
    return found if os.access(found, os.X_OK) else None


@pytest.fixture(scope="module")
def probe():
    cargo = _cargo()
    if cargo is None or not any(REGISTRY.glob("rustls-0.20*")) or not any(REGISTRY.glob("rustls-pemfile-1*")):
        pytest.skip("needs cargo and Debian's librust-rustls-dev / librust-rustls-pemfile-dev")
    env = dict(os.environ, CARGO_TARGET_DIR=str(TARGET))
    build = subprocess.run(
        [cargo, "build", "--offline", "-q", "--config", 'source.crates-io.replace-with="debian"',
         "--config", f'source.debian.directory="{REGISTRY}"'],
        cwd=PROBE_SRC, env=env, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, f"building the rustls probe failed:\n{build.stderr}"
    return str(TARGET / "debug" / "rustls-probe")


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    ft.tls.generate_certs(d, client=True)
    return d


def _frames(out: str):
    line = next(x for x in out.splitlines() if x.startswith("frame "))
    return list(F.FrameDecoder().feed(bytes.fromhex(line.split()[1])))


async def _rustls_client(probe, port, certs, name="localhost", client_cert=False):
    args = [probe, "client", f"127.0.0.1:{port}", name, str(certs / "ca.pem"), RUST_HANDSHAKE]
    if client_cert:
        args += [str(certs / "client.pem"), str(certs / "client.key")]
    p = await asyncio.create_subprocess_exec(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(p.communicate(), 20)
    return p.returncode, out.decode(), err.decode()


def test_rustls_client_against_our_tls_server(run, probe, certs):
    async def body():
        ctx = ft.tls.server_context(certs / "server.pem", certs / "server.key")
        async with ft.TunnelServer(("127.0.0.1", 0), "secret", tls=ctx) as server:
            rc, out, err = await _rustls_client(probe, server.address[1], certs)
            assert rc == 0, err
            assert "protocol TLSv1_3" in out
            ack, = _frames(out)
            assert isinstance(ack, F.HandshakeAck) and ack.status == ft.HandshakeStatus.SUCCESS
            # a name the certificate does not carry: webpki refuses it, and the server serves on
            rc, out, err = await _rustls_client(probe, server.address[1], certs, name="elsewhere.example")
            assert rc == 1 and "NotValidForName" in err
            rc, out, err = await _rustls_client(probe, server.address[1], certs)
            assert rc == 0, err
    run(body)


def test_rustls_client_certificate_against_our_mtls_server(run, probe, certs):
    async def body():
        ctx = ft.tls.server_context(certs / "server.pem", certs / "server.key", cafile=certs / "ca.pem",
                                    require_client_cert=True)
        async with ft.TunnelServer(("127.0.0.1", 0), "secret", tls=ctx) as server:
            rc, out, err = await _rustls_client(probe, server.address[1], certs, client_cert=True)
            assert rc == 0, err
            ack, = _frames(out)
            assert ack.status == ft.HandshakeStatus.SUCCESS
            rc, out, err = await _rustls_client(probe, server.address[1], certs)  # no client certificate
            assert rc == 1 and not out
    run(body)


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mtls"])
def test_our_client_against_rustls_server(run, probe, certs, mutual):
    async def body():
        ack = F.encode(F.HandshakeAck(session_id=uuid.uuid4(), status=ft.HandshakeStatus.SUCCESS, version=1,
                                      server_capabilities=["basic"])).hex()
        args = [probe, "server", str(certs / "server.pem"), str(certs / "server.key"), ack]
        if mutual:
            args.append(str(certs / "ca.pem"))
        p = await asyncio.create_subprocess_exec(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            port = int((await asyncio.wait_for(p.stdout.readline(), 20)).split()[1])
            ctx = ft.tls.client_context(certs / "ca.pem", certfile=certs / "client.pem" if mutual else None,
                                        keyfile=certs / "client.key" if mutual else None)
            client = ft.TunnelClient(f"localhost:{port}", "secret", tls=ctx)
            session = await asyncio.wait_for(client.connect(), 20)
            assert not session.flow_control  # a Rust peer: no extensions
            frame_line = (await asyncio.wait_for(p.stdout.readline(), 20)).decode()
            protocol = (await asyncio.wait_for(p.stdout.readline(), 20)).decode()
            hs, = _frames(frame_line)
            assert isinstance(hs, F.Handshake) and hs.token == "secret" and "TLSv1_3" in protocol
            await client.close()
            assert await asyncio.wait_for(p.wait(), 20) == 0
        finally:
            if p.returncode is None:
                p.kill()
                await p.wait()
    run(body)
