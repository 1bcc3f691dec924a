"""Per-client tokens (``server --client-tokens FILE.toml``): each token claims only its own tunnel
ids; another id is refused with the reason and does not count as a failed login; the shared
token still works; the file is re-read on SIGHUP."""

from __future__ import annotations

import asyncio
import hashlib
import signal
import time

import pytest

import ferrotunnel as ft
from ferrotunnel.server.client_tokens import ClientTokens, PolicyServer, TokensFileError, load_tokens

from conftest import free_port
from test_cli import Proc

ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-0123456789abcdef-bob"
SHARED = "shared-token-0123456789abcdef"


def tokens_file(tmp_path, text=None):
    p = tmp_path / "tokens.toml"
    p.write_text(text if text is not None else
                 f'[[token]]\ntoken = "{ALICE}"\ntunnels = ["alice-*", "Web"]\n'
                 f'[[token]]\nsha256 = "{hashlib.sha256(BOB.encode()).hexdigest()}"\ntunnels = ["bob"]\n')
    return p


def test_the_file_and_what_each_token_may_claim(tmp_path):
    t = ClientTokens(str(tokens_file(tmp_path)))
    alice, bob = t.match(ALICE), t.match(BOB)
    assert alice is not None and bob is not None and t.match("someone-else-0123456789") is None
    assert alice.allows("alice-1") and alice.allows("WEB") and not alice.allows("bob") and not alice.allows("alice")
    assert bob.allows("bob") and not bob.allows("bobby")
    assert ALICE not in repr(t) + repr(alice)


@pytest.mark.parametrize("text, why", [
    ('[[token]]\ntoken = "short"\ntunnels = ["a"]\n', "token[1]: key 'token': must be a string of at least 16"),
    (f'[[token]]\ntoken = "{ALICE}"\nsha256 = "{"0" * 64}"\ntunnels = ["a"]\n', "token[1]: give exactly one"),
    ('[[token]]\nsha256 = "xyz"\ntunnels = ["a"]\n', "token[1]: key 'sha256': must be 64 hex digits"),
    (f'[[token]]\ntoken = "{ALICE}"\n', "token[1]: key 'tunnels': must be a non-empty list"),
    (f'[[token]]\ntoken = "{ALICE}"\ntunnels = []\n', "key 'tunnels'"),
    (f'[[token]]\ntoken = "{ALICE}"\ntunnels = ["a"]\nextra = 1\n', "token[1]: unknown key 'extra'"),
    ('other = 1\n', "unknown key 'other'"),
    ('[[token]\n', "not valid TOML"),
])
def test_bad_files_are_refused_naming_the_entry_and_never_the_token(tmp_path, text, why):
    with pytest.raises(TokensFileError) as err:
        load_tokens(str(tokens_file(tmp_path, text)))
    assert why in str(err.value) and ALICE not in str(err.value)


def test_a_reload_that_fails_keeps_the_tokens_in_force(tmp_path):
    p = tokens_file(tmp_path)
    t = ClientTokens(str(p))
    p.write_text("[[token]\n")
    assert not t.reload() and t.match(ALICE) is not None
    p.write_text(f'[[token]]\ntoken = "{BOB}"\ntunnels = ["*"]\n')
    assert t.reload() and t.match(ALICE) is None and t.match(BOB).allows("anything")


async def _claim(server, token, tunnel_id, extensions=True):
    client = ft.TunnelClient("%s:%d" % server.address, token, tunnel_id=tunnel_id,
                             config=ft.ClientConfig(extensions=extensions))
    task = asyncio.create_task(client.connect_and_run())
    try:
        await server.wait_for_session(tunnel_id, timeout=10)
        return None
    except TimeoutError:
        pass
    finally:
        task.cancel()
    try:
        await task
    except BaseException as exc:  # noqa: BLE001 - the refusal is what the test looks at
        return exc
    return None


def test_each_token_claims_only_its_ids_and_a_refusal_is_no_failed_login(run, tmp_path):
    async def body():
        tokens = ClientTokens(str(tokens_file(tmp_path)))
        cfg = ft.ServerConfig(auth_failure_threshold=3)
        async with PolicyServer(("127.0.0.1", 0), SHARED, client_tokens=tokens, config=cfg) as server:
            assert await _claim(server, ALICE, "alice-1") is None
            assert await _claim(server, BOB, "bob") is None
            assert await _claim(server, SHARED, "anything") is None  # the shared token: any id
            for _ in range(5):  # more than the throttle's threshold: still no throttling
                exc = await asyncio.wait_for(_refused(server, ALICE, "bob"), 20)
                assert isinstance(exc, ft.AuthenticationError), exc
                assert "tunnel id 'bob' is not allowed for this token" in str(exc)
            assert await _claim(server, ALICE, "web") is None  # the same address is not throttled
            assert server.refused_ids == 5
            # a Rust-style client sees InvalidToken, without the reason
            exc = await asyncio.wait_for(_refused(server, ALICE, "bob", extensions=False), 20)
            assert isinstance(exc, ft.AuthenticationError) and "not allowed" not in str(exc)
    run(body, timeout=120)


def test_a_reload_closes_the_sessions_of_revoked_tokens_and_of_ids_no_longer_allowed(run, tmp_path, caplog):
    """Re-reading the file (SIGHUP) ends what it no longer allows: a session whose token is gone,
    and one whose tunnel id its token no longer covers; the others stay, and a file that does not
    load changes nothing."""
    p = tokens_file(tmp_path)

    async def live(server, tunnel_id):
        client = ft.TunnelClient("%s:%d" % server.address, ALICE if tunnel_id != "bob" else BOB, tunnel_id=tunnel_id,
                                 config=ft.ClientConfig(backoff=ft.BackoffConfig(max_attempts=1)))
        task = asyncio.create_task(client.connect_and_run())
        await server.wait_for_session(tunnel_id, timeout=10)
        return task, server.registry.lookup_local(tunnel_id).session

    async def body():
        async with PolicyServer(("127.0.0.1", 0), SHARED, client_tokens=ClientTokens(str(p))) as server:
            tasks, sessions = zip(*[await live(server, tid) for tid in ("alice-1", "web", "bob")])
            p.write_text("not toml [")
            assert not server.reload_tokens()  # nothing changes
            await asyncio.sleep(0.2)
            assert not any(s.is_closed for s in sessions) and server.revoked_sessions == 0
            # Bob's token goes; Alice's keeps "web" only
            p.write_text(f'[[token]]\ntoken = "{ALICE}"\ntunnels = ["web"]\n')
            assert server.reload_tokens()
            await asyncio.wait_for(sessions[0].closed_event.wait(), 10)
            await asyncio.wait_for(sessions[2].closed_event.wait(), 10)
            assert not sessions[1].is_closed and server.revoked_sessions == 2
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    with caplog.at_level("WARNING", logger="ferrotunnel.server"):
        run(body, timeout=60)
    said = "\n".join(r.getMessage() for r in caplog.records)
    assert "its token was revoked" in said and "no longer allows tunnel id alice-1" in said, said
    assert ALICE not in said and BOB not in said


async def _refused(server, token, tunnel_id, extensions=True):
    client = ft.TunnelClient("%s:%d" % server.address, token, tunnel_id=tunnel_id,
                             config=ft.ClientConfig(extensions=extensions))
    try:
        await client.connect_and_run()
    except BaseException as exc:  # noqa: BLE001
        return exc
    return None


def test_without_a_shared_token_only_the_client_tokens_admit(run, tmp_path):
    async def body():
        tokens = ClientTokens(str(tokens_file(tmp_path)))
        async with PolicyServer(("127.0.0.1", 0), None, client_tokens=tokens) as server:
            assert await _claim(server, ALICE, "alice-x") is None
            exc = await asyncio.wait_for(_refused(server, SHARED, "alice-y"), 20)
            assert isinstance(exc, ft.AuthenticationError) and "not allowed" not in str(exc)
    run(body, timeout=60)


def test_cli_refuses_an_id_outside_the_list_and_rereads_the_file_on_sighup(tmp_path):
    p = tokens_file(tmp_path)
    tport = free_port()
    procs = []  # every process started here is killed at the end, whatever happened
    try:
        srv = Proc("server", "--bind", f"127.0.0.1:{tport}", "--client-tokens", str(p),
                   env={"FERROTUNNEL_TOKEN": "", "FERROTUNNEL_TOKEN_FILE": ""})
        procs.append(srv)
        srv.wait_for("listening")
        t0 = time.monotonic()
        cli = Proc("client", "--server", f"127.0.0.1:{tport}", "--tunnel-id", "bob", env={"FERROTUNNEL_TOKEN": ALICE})
        procs.append(cli)
        cli.p.wait(20)
        assert cli.finish() == 1 and time.monotonic() - t0 < 15
        err = cli.err.decode()
        assert "tunnel id 'bob' is not allowed for this token" in err and "must equal the server's" not in err, err
        assert ALICE not in err + cli.out.decode()
        p.write_text(f'[[token]]\ntoken = "{ALICE}"\ntunnels = ["bob"]\n')
        srv.p.send_signal(signal.SIGHUP)
        srv.wait_until(lambda: b"client tokens reloaded" in srv.err, what="the reload")
        ok = Proc("client", "--server", f"127.0.0.1:{tport}", "--tunnel-id", "bob", env={"FERROTUNNEL_TOKEN": ALICE})
        procs.append(ok)
        ok.wait_for("connected to", timeout=20)
        ok.kill()
        assert srv.finish() == 0
        assert ALICE not in (srv.out + srv.err).decode()
    finally:
        for proc in procs:
            proc.kill()
