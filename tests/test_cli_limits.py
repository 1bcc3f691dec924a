"""``ferrotunnel server --limit NAME=VALUE`` (and FERROTUNNEL_LIMITS): any numeric limit of the
README's table from the command line; an unknown name, a malformed value or a value the
configuration refuses is exit 2 with a message that says what to change. The real command in a
subprocess, once with a limit that visibly takes effect (max_sessions=1 refuses a second client)."""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any, Dict

import pytest

import ferrotunnel as ft
from ferrotunnel.cli import commands
from ferrotunnel.cli.limits import numeric_limits, parse_limits
from ferrotunnel.cli.common import UsageError

from conftest import free_port
from test_cli import ENV, Proc, cleanup  # noqa: F401 (cleanup is a fixture)

TOKEN = "cli-limits-token-0123456789"


class Made(Exception):
    """The command made its server; ``config`` is what it was given."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config


def _serve(argv, monkeypatch, env: Dict[str, str] = None):
    monkeypatch.delenv("FERROTUNNEL_LIMITS", raising=False)
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)

    def made(*args, config=None, **kwargs):
        raise Made(config)

    monkeypatch.setattr(ft, "TunnelServer", made)
    return commands.main(["server", "--bind", f"127.0.0.1:{free_port()}", "--token", TOKEN, *argv])


def test_limits_reach_the_server_config(monkeypatch):
    with pytest.raises(Made) as made:
        _serve(["--limit", "max_sessions=5000", "--limit", "server_recv_limit=2GiB",
                "--limit", "ingress-idle-timeout=12.5", "--trusted-proxy", "10.0.0.0/8"], monkeypatch)
    cfg = made.value.config
    assert (cfg.max_sessions, cfg.server_recv_limit, cfg.ingress_idle_timeout) == (5000, 2 << 30, 12.5)
    assert cfg.trusted_proxies == ("10.0.0.0/8",) and cfg.accept_client_streams is False
    assert cfg.max_ports_per_address == ft.ServerConfig().max_ports_per_address  # the rest: the defaults


def test_limits_from_the_environment(monkeypatch):
    with pytest.raises(Made) as made:
        _serve([], monkeypatch, {"FERROTUNNEL_LIMITS": "max_ports_per_address=8, session_recv_limit=256MiB"})
    assert (made.value.config.max_ports_per_address, made.value.config.session_recv_limit) == (8, 256 << 20)


@pytest.mark.parametrize("spec, said", [
    ("max_sesions=10", "no limit named 'max_sesions'; did you mean 'max_sessions'?"),
    ("trusted_proxies=1", "no limit named 'trusted_proxies'"),  # not a number: its own flag
    ("max_sessions", "expected NAME=VALUE"),
    ("max_sessions=ten", "must be a whole number"),
    ("max_sessions=-1", "must be a whole number"),
    ("max_sessions=1.5", "must be a whole number"),
    ("max_sessions=2TB", "must be a whole number"),
    ("handshake_timeout=soon", "must be a number"),
    ("max_sessions=0", "--limit: max_sessions must be positive"),  # the configuration's own check
    ("session_recv_limit=1KiB", "--limit: session_recv_limit (1024) must be at least session_recv_budget"),
])
def test_a_bad_limit_is_exit_2_saying_what_to_change(spec, said, monkeypatch, capsys):
    assert _serve(["--limit", spec], monkeypatch) == 2
    err = capsys.readouterr().err
    assert said in err, err
    assert "Traceback" not in err


def test_a_limit_given_twice_is_refused():
    with pytest.raises(UsageError, match="given twice"):
        parse_limits(["max_sessions=5", "max-sessions=6"])


def test_every_numeric_limit_is_named_in_the_readme():
    import pathlib

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = [name for name in numeric_limits() if not re.search(rf"`{name}`", readme)]
    assert not missing, missing
    assert "--limit" in readme


def test_the_real_command_applies_a_limit(cleanup):  # noqa: F811
    """max_sessions=1 through the CLI: the second client is refused RateLimited (the first stays)."""
    port = free_port()
    srv = Proc("server", "--bind", f"127.0.0.1:{port}", "--limit", "max_sessions=1", "--log-level", "info",
               env={"FERROTUNNEL_TOKEN": TOKEN})
    cleanup.append(srv)
    srv.wait_until(lambda: b"listening on" in srv.out + srv.err, 30, "listening")
    first = Proc("client", "--server", f"127.0.0.1:{port}", "--tunnel-id", "one", "--local-addr", "127.0.0.1:9",
                 env={"FERROTUNNEL_TOKEN": TOKEN})
    cleanup.append(first)
    first.wait_for("tunnel id one", 30)
    second = Proc("client", "--server", f"127.0.0.1:{port}", "--tunnel-id", "two", "--local-addr", "127.0.0.1:9",
                  env={"FERROTUNNEL_TOKEN": TOKEN})
    cleanup.append(second)
    second.wait_until(lambda: b"RATE_LIMITED" in second.err or b"RateLimited" in second.err, 30, "the refusal")
    assert first.p.poll() is None


def test_the_real_command_exits_2_on_a_bad_limit():
    r = subprocess.run([sys.executable, "-m", "ferrotunnel", "server", "--bind", f"127.0.0.1:{free_port()}",
                        "--token", TOKEN, "--limit", "max_sesions=3"], capture_output=True, text=True, env=ENV,
                       timeout=30, stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and "did you mean 'max_sessions'" in r.stderr and "Traceback" not in r.stderr, r.stderr
