"""The CLI server's shared token needs ``MIN_SERVER_TOKEN_LENGTH`` (16) characters, as each
``--client-tokens`` entry does, from every source (--token, --token-file, FERROTUNNEL_TOKEN,
FERROTUNNEL_TOKEN_FILE): a shorter one is exit 2 with a message that says how to make one (never
a traceback, never the token); 16 characters start the server. The library's ``TunnelServer``
and the client take any token the protocol allows."""

from __future__ import annotations

import subprocess
import sys

import pytest

import ferrotunnel as ft
from ferrotunnel import auth
from ferrotunnel.cli import commands

from conftest import free_port
from test_cli import ENV, Proc, cleanup  # noqa: F401 (cleanup is a fixture)

MIN_SERVER_TOKEN_LENGTH = 16  # as --client-tokens entries
SHORT = "short-secret-15"  # 15 characters
assert len(SHORT) == MIN_SERVER_TOKEN_LENGTH - 1


class Started(Exception):
    """The command went on to make its server (it was not refused)."""


def _serve(argv, monkeypatch, env=None):
    """``ferrotunnel server ARGV`` in process, up to the making of its server (which raises Started)."""
    for k in ("FERROTUNNEL_TOKEN", "FERROTUNNEL_TOKEN_FILE", "FERROTUNNEL_CLIENT_TOKENS"):
        monkeypatch.delenv(k, raising=False)
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)

    def made(*args, **kwargs):
        raise Started

    monkeypatch.setattr(ft, "TunnelServer", made)
    monkeypatch.setattr("ferrotunnel.server.client_tokens.PolicyServer", made)
    return commands.main(["server", "--bind", f"127.0.0.1:{free_port()}", *argv])


@pytest.mark.parametrize("source", ["--token", "--token-file", "FERROTUNNEL_TOKEN", "FERROTUNNEL_TOKEN_FILE"])
def test_a_short_shared_token_is_exit_2_with_how_to_make_one(source, tmp_path, monkeypatch, capsys):
    path = tmp_path / "token.txt"
    path.write_text(SHORT + "\n")
    argv, env = {"--token": (["--token", SHORT], None), "--token-file": (["--token-file", str(path)], None),
                 "FERROTUNNEL_TOKEN": ([], {"FERROTUNNEL_TOKEN": SHORT}),
                 "FERROTUNNEL_TOKEN_FILE": ([], {"FERROTUNNEL_TOKEN_FILE": str(path)})}[source]
    assert _serve(argv, monkeypatch, env) == 2
    err = capsys.readouterr().err
    assert "shorter than 16 characters" in err and "secrets.token_urlsafe" in err, err
    assert SHORT not in err


def test_a_short_shared_token_is_refused_beside_client_tokens_too(tmp_path, monkeypatch, capsys):
    tokens = tmp_path / "tokens.toml"
    tokens.write_text('[[token]]\ntoken = "alice-token-0123456789"\ntunnels = ["a"]\n')
    assert _serve(["--client-tokens", str(tokens), "--token", SHORT], monkeypatch) == 2
    assert "shorter than 16 characters" in capsys.readouterr().err


@pytest.mark.parametrize("token", ["x" * MIN_SERVER_TOKEN_LENGTH, "y" * 256])
def test_sixteen_characters_and_more_go_on(token, monkeypatch):
    with pytest.raises(Started):
        _serve(["--token", token], monkeypatch)


def test_the_real_command_exits_2_without_a_traceback():
    r = subprocess.run([sys.executable, "-m", "ferrotunnel", "server", "--bind", f"127.0.0.1:{free_port()}",
                        "--token", SHORT], capture_output=True, text=True, env=ENV, timeout=30,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "shorter than 16 characters" in r.stderr and SHORT not in r.stderr
    assert r.stderr.startswith("ferrotunnel server: ")


def test_sixteen_characters_start_the_server(cleanup):  # noqa: F811
    token = "x" * MIN_SERVER_TOKEN_LENGTH
    srv = Proc("server", "--bind", f"127.0.0.1:{free_port()}", env={"FERROTUNNEL_TOKEN": token})
    cleanup.append(srv)
    srv.wait_for("listening on")


def test_the_minimum_is_named():
    assert auth.MIN_SERVER_TOKEN_LENGTH == MIN_SERVER_TOKEN_LENGTH


def test_the_library_and_the_client_take_shorter_tokens():
    """Only the CLI server asks for 16: a Rust server's clients may have shorter tokens."""
    ft.TunnelServer(("127.0.0.1", 0), "s")
    ft.TunnelClient("127.0.0.1:1", "s")
