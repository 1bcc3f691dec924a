"""The token stays secret on the command line: --token-file and FERROTUNNEL_TOKEN_FILE, --token
taken out of /proc/PID/cmdline at start-up (same PID), the precedence of the sources, and usage
errors that name the file but never its content. Real subprocesses on 127.0.0.1."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from conftest import free_port
from ferrotunnel.cli import commands, secrets
from test_cli import ENV, Proc, cleanup  # noqa: F401  (cleanup is a fixture)

SECRET = "cmdline-secret-7f3a9c"
MARK = "_FERROTUNNEL_TOKEN_FROM_ARGV"


def cmdline(proc: Proc) -> bytes:
    with open(f"/proc/{proc.p.pid}/cmdline", "rb") as f:
        return f.read()


def assert_hidden(proc: Proc, *, warned: bool) -> None:
    line = cmdline(proc)
    assert b"ferrotunnel" in line  # the process that was started, still running under its PID
    assert SECRET.encode() not in line and b"--token" not in line.replace(b"--token-file", b"")
    warnings = [x for x in proc.err.decode().splitlines() if "WARNING" in x and "--token" in x]
    if warned:
        assert len(warnings) == 1, proc.err
        assert "process list" in warnings[0] and "--token-file" in warnings[0] and "FERROTUNNEL_TOKEN" in warnings[0]
    else:
        assert warnings == [], proc.err


def assert_never_printed(*procs: Proc) -> None:
    for p in procs:
        assert SECRET.encode() not in p.out + p.err


@pytest.mark.skipif(not os.path.exists("/proc/self/cmdline"), reason="needs /proc")
@pytest.mark.parametrize("form", ["separate", "equals"])
def test_token_flag_is_removed_from_the_process_list(cleanup, form):  # noqa: F811
    tport = free_port()
    flag = ["--token", SECRET] if form == "separate" else [f"--token={SECRET}"]
    srv = Proc("server", *flag, "--bind", f"127.0.0.1:{tport}")
    cleanup.append(srv)
    srv.wait_for(f"listening on 127.0.0.1:{tport}")
    assert_hidden(srv, warned=True)
    # FERROTUNNEL_TOKEN in the environment must not win over the flag (the re-exec moves it there)
    cli = Proc("client", "--server", f"127.0.0.1:{tport}", *flag, "--local-addr", "127.0.0.1:9",
               env={"FERROTUNNEL_TOKEN": "some-other-token"})
    cleanup.append(cli)
    cli.wait_for(f"connected to 127.0.0.1:{tport}")
    assert_hidden(cli, warned=True)
    assert cli.finish() == 0 and srv.finish() == 0
    assert_never_printed(srv, cli)


@pytest.mark.skipif(not os.path.exists("/proc/self/cmdline"), reason="needs /proc")
def test_token_file_and_its_environment_variable(cleanup, tmp_path):  # noqa: F811
    tport = free_port()
    path = tmp_path / "token"
    path.write_text(f"  {SECRET}  \r\nsecond line is ignored\n")
    srv = Proc("server", "--token-file", path, "--bind", f"127.0.0.1:{tport}")
    cleanup.append(srv)
    srv.wait_for("listening on")
    assert_hidden(srv, warned=False)
    cli = Proc("client", "--server", f"127.0.0.1:{tport}", "--local-addr", "127.0.0.1:9",
               env={"FERROTUNNEL_TOKEN_FILE": str(path)})
    cleanup.append(cli)
    cli.wait_for("connected to")  # the same token from both: the server accepted it
    assert_hidden(cli, warned=False)
    assert cli.finish() == 0 and srv.finish() == 0
    assert_never_printed(srv, cli)


def test_marker_prevents_a_second_reexec(cleanup):  # noqa: F811
    """A process started with the re-exec marker (as the re-executed one is) does not execute
    itself again, whatever its arguments say: no loop."""
    tport = free_port()
    srv = Proc("server", "--token", "ignored-here-1", "--bind", f"127.0.0.1:{tport}",
               env={MARK: "1", "FERROTUNNEL_TOKEN": SECRET})
    cleanup.append(srv)
    srv.wait_for("listening on")
    assert b"--token" in cmdline(srv)  # not re-executed
    assert b"still in the process list" in srv.err
    cli = Proc("client", "--server", f"127.0.0.1:{tport}", "--local-addr", "127.0.0.1:9",
               env={"FERROTUNNEL_TOKEN": SECRET})  # the server took its token from the environment
    cleanup.append(cli)
    cli.wait_for("connected to")


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "ferrotunnel", *map(str, args)], capture_output=True, text=True,
                          env={**ENV, **(env or {})}, stdin=subprocess.DEVNULL, timeout=30)


@pytest.mark.parametrize("role", ["server", "client"])
@pytest.mark.parametrize("case,message", [
    ("missing", "no such file"),
    ("directory", "is a directory"),
    ("empty", "the first line is empty"),
    ("blank_first_line", "the first line is empty"),
    ("binary", "not UTF-8 text"),
    ("invalid", "invalid token (from --token-file"),
    ("unreadable", "permission denied"),
    ("both", "not both"),
    ("env_missing", "no such file"),
])
def test_token_file_usage_errors(tmp_path, role, case, message):
    if case == "unreadable" and os.geteuid() == 0:
        pytest.skip("root reads any file")
    path = tmp_path / "token-file"
    secret = SECRET.encode()
    content = {"empty": b"", "blank_first_line": b"\n" + secret + b"\n", "binary": b"\xff\xfe" + secret,
               "invalid": secret + b"\tx\n", "unreadable": secret, "both": secret}
    if case == "directory":
        path.mkdir()
    elif case in content:
        path.write_bytes(content[case])
    if case == "unreadable":
        path.chmod(0)
    extra = ["--server", "127.0.0.1:1"] if role == "client" else ["--bind", f"127.0.0.1:{free_port()}"]
    flags = ["--token-file", path]
    env = None
    if case == "both":
        flags += ["--token", SECRET]
    if case == "env_missing":
        flags, env = [], {"FERROTUNNEL_TOKEN_FILE": str(path)}
    r = run_cli(role, *flags, *extra, env=env)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert message in r.stderr
    if case != "both":
        assert str(path) in r.stderr  # names the path
    assert SECRET not in r.stdout + r.stderr  # never the content
    assert len(r.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------ precedence and argv, in-process


def token_of(argv, monkeypatch, env=None, tty=False):
    for k in ("FERROTUNNEL_TOKEN", "FERROTUNNEL_TOKEN_FILE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: tty, raising=False)
    monkeypatch.setattr(secrets.getpass, "getpass", lambda prompt: "from-the-prompt")
    args = commands.build_parser().parse_args(["server", *argv])
    return secrets.token_from_args(args)


def test_token_precedence(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("from-flag-file\n")
    b.write_text("from-env-file\n")
    both_env = {"FERROTUNNEL_TOKEN": "from-env", "FERROTUNNEL_TOKEN_FILE": str(b)}
    assert token_of(["--token-file", str(a)], monkeypatch, both_env, tty=True) == "from-flag-file"
    assert token_of(["--token", "from-flag"], monkeypatch, both_env, tty=True) == "from-flag"
    assert token_of([], monkeypatch, both_env, tty=True) == "from-env"
    assert token_of([], monkeypatch, {"FERROTUNNEL_TOKEN_FILE": str(b)}, tty=True) == "from-env-file"
    assert token_of([], monkeypatch, tty=True) == "from-the-prompt"
    with pytest.raises(commands.UsageError, match="no token"):
        token_of([], monkeypatch, tty=False)
    with pytest.raises(commands.UsageError, match="not both"):
        token_of(["--token", "x-y-z", "--token-file", str(a)], monkeypatch)


def test_help_documents_the_precedence(capsys):
    for role in ("server", "client"):
        with pytest.raises(SystemExit):
            commands.build_parser().parse_args([role, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert "--token-file PATH" in out
        assert ("--token-file PATH or --token (not both), then FERROTUNNEL_TOKEN, then the file named by "
                "FERROTUNNEL_TOKEN_FILE, then a prompt") in out


@pytest.mark.parametrize("argv,rest,token", [
    (["server", "--token", "s3", "--bind", "a:1"], ["server", "--bind", "a:1"], "s3"),
    (["server", "--token=s3", "--bind", "a:1"], ["server", "--bind", "a:1"], "s3"),
    (["client", "--token", "one", "--server", "h:1", "--token=two"], ["client", "--server", "h:1"], "two"),
    (["server", "--token-file", "f", "--token", "s"], ["server", "--token-file", "f"], "s"),
    (["server", "--token=", "--bind", "a:1"], ["server", "--bind", "a:1"], ""),
    (["server", "--bind", "a:1"], ["server", "--bind", "a:1"], None),
])
def test_argv_without_token(argv, rest, token):
    assert secrets.without_token(argv) == (rest, token)


def test_in_process_main_never_reexecutes(monkeypatch):
    """main(argv) called by a program (not the command) must not replace that program."""
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("execve called"))
    monkeypatch.delenv(MARK, raising=False)
    assert commands.main(["server", "--token", SECRET, "--bind", "nonsense"]) == 2


def test_cli_server_refuses_client_opened_streams(monkeypatch):
    """The CLI server has no handler for streams a client opens: its config turns them off."""
    import ferrotunnel as ft

    seen = []

    class Stop(Exception):
        pass

    def fake_server(bind, token, *, tls=None, config=None, registry=None, domain=None):
        seen.append(config)
        raise Stop

    monkeypatch.setattr(ft, "TunnelServer", fake_server)
    monkeypatch.delenv(MARK, raising=False)
    with pytest.raises(Stop):
        commands.main(["server", "--token", "a-b-c-d-e-f-g-h-i", "--bind", f"127.0.0.1:{free_port()}"])
    assert len(seen) == 1 and seen[0].accept_client_streams is False
    assert ft.ServerConfig().accept_client_streams is True  # the library keeps them on
    assert isinstance(commands.server_config(), ft.ServerConfig)



@pytest.mark.parametrize("err,message", [
    (errno.EACCES, "permission denied; it must be readable by the user running ferrotunnel"),
    (errno.EIO, "cannot read it (Input/output error)"),
])
def test_unreadable_token_file(tmp_path, monkeypatch, err, message):
    """What root cannot be shown with chmod: an open that fails names the path and the reason."""
    import builtins

    path = tmp_path / "token"
    path.write_text(SECRET)
    real_open = builtins.open

    def failing_open(file, *a, **k):
        if str(file) == str(path):
            raise OSError(err, os.strerror(err), str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", failing_open)
    with pytest.raises(commands.UsageError) as ei:
        secrets.read_token_file(str(path), "--token-file")
    assert str(ei.value) == f"--token-file {path}: {message}"
