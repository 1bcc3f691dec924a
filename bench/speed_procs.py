"""Processes for bench/speed.py: the C load generator (built from ``../shared/tools/loadgen.c``),
the relay2 baseline (two 1:1 uvloop relays of bench/e2e.py chained) and tunnel pairs run as the
CLI (``bench/speed_cli.py``, i.e. ``ferrotunnel server --tcp-bind`` and ``ferrotunnel client
--log-level warning``). Every process started here is recorded in a ``Procs`` and killed by its
PID when the ``Procs`` closes, whatever happened.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import e2e

HERE = os.path.dirname(os.path.abspath(__file__))
LOADGEN_SOURCE = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "tools", "loadgen.c"))
TOKEN = "speed-bench-token-0123456789"


class BenchError(RuntimeError):
    """A benchmark step that could not run (a process died, a load run failed)."""


def build_loadgen(path: str = "") -> str:
    """The loadgen binary: ``path`` if it is one, else compiled from ``path`` (or the shared
    source) with ``gcc -O2 -pthread`` into a cache file named by the source's hash."""
    path = path or os.environ.get("FT_LOADGEN", "") or LOADGEN_SOURCE
    if not os.path.exists(path):
        raise BenchError(f"loadgen not found at {path}: give --loadgen PATH (loadgen.c or a built binary)")
    if not path.endswith(".c"):
        if not os.access(path, os.X_OK):
            raise BenchError(f"{path} is not executable (give loadgen.c or a built loadgen binary)")
        return path
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    out = os.path.join(tempfile.gettempdir(), f"ferrotunnel-loadgen-{digest}")
    if not os.path.exists(out):
        if shutil.which("gcc") is None:
            raise BenchError("gcc is needed to build loadgen.c (or give --loadgen with a built binary)")
        tmp = f"{out}.{os.getpid()}"
        subprocess.run(["gcc", "-O2", "-pthread", "-o", tmp, path], check=True)
        os.replace(tmp, out)
    return out


def raise_fd_limit(want: int = 65536) -> int:
    """Raise this process's RLIMIT_NOFILE (children inherit it): row 8 holds ~10,000 idle
    connections, i.e. ~20,000 descriptors in relay2's inner relay."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for new in ((max(want, hard), max(want, hard)), (hard, hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, new)
            return new[0]
        except (ValueError, OSError):
            continue
    return soft


class Procs:
    """Every process of one benchmark run; ``close()`` kills each by PID and reaps it."""

    def __init__(self, logdir: str) -> None:
        self.logdir = logdir
        self.procs: list = []

    def popen(self, name: str, cmd: list, env=None, **kw) -> subprocess.Popen:
        if "stdout" not in kw:
            log = open(os.path.join(self.logdir, f"{name}-{len(self.procs)}.log"), "w")
            kw.update(stdout=log, stderr=subprocess.STDOUT)
        p = subprocess.Popen(cmd, env=env, **kw)
        p.bench_name = name
        p.bench_log = getattr(kw["stdout"], "name", None)
        p.bench_logfile = kw["stdout"] if p.bench_log else None
        self.procs.append(p)
        return p

    def kill(self, p) -> None:
        if p is None:
            return
        if p.poll() is None:
            p.kill()
        p.wait()
        if getattr(p, "bench_logfile", None) is not None:
            p.bench_logfile.close()
        if p in self.procs:
            self.procs.remove(p)

    def close(self) -> None:
        pending = None
        for p in list(self.procs):
            try:
                self.kill(p)
            except BaseException as exc:  # a signal or an error: keep killing the others, then raise
                try:
                    p.kill()
                except OSError:
                    pass
                pending = pending or exc
        if pending is not None:
            raise pending

    def __enter__(self) -> "Procs":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def log_tail(p, lines: int = 15) -> str:
    if not getattr(p, "bench_log", None):
        return ""
    with open(p.bench_log, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def wait_for_line(p, pattern: str, timeout: float = 30.0) -> str:
    """Wait until the process's log has a line matching ``pattern``; BenchError if it exits first."""
    deadline = time.monotonic() + timeout
    rx = re.compile(pattern)
    while time.monotonic() < deadline:
        with open(p.bench_log, errors="replace") as f:
            for line in f:
                if rx.search(line):
                    return line
        if p.poll() is not None:
            raise BenchError(f"{p.bench_name} exited with {p.returncode} before '{pattern}':\n{log_tail(p)}")
        time.sleep(0.05)
    raise BenchError(f"{p.bench_name}: no '{pattern}' within {timeout:.0f} s:\n{log_tail(p)}")


class Path:
    """One way from a visitor to the loadgen backend: ``port`` to connect to and ``pids`` of
    the relaying processes (both tunnel ends, or both relays) whose CPU and memory count."""

    def __init__(self, name: str, procs: Procs) -> None:
        self.name, self.procs, self.members, self.port = name, procs, [], 0

    @property
    def pids(self) -> list:
        return [p.pid for p in self.members]

    def check(self) -> None:
        for p in self.members:
            if p.poll() is not None:
                raise BenchError(f"{self.name}: {p.bench_name} (pid {p.pid}) exited with {p.returncode}:\n"
                                 f"{log_tail(p)}")

    def stop(self) -> None:
        for p in self.members:
            self.procs.kill(p)
        self.members = []


class Relay2(Path):
    """Two 1:1 uvloop relays of bench/e2e.py in series in front of the backend."""

    def start(self, backend_port: int) -> "Relay2":
        self.stop()
        inner, outer = e2e.free_port(), e2e.free_port()
        for port, target in ((inner, backend_port), (outer, inner)):
            p = self.procs.popen("relay", [sys.executable, e2e.__file__, "--role", "relay", str(port), str(target)])
            wait_for_line(p, r"^ready")
            self.members.append(p)
        self.members.reverse()  # outer (the visitor's side) first
        self.port = outer
        return self


class Tunnel(Path):
    """A ``ferrotunnel server --tcp-bind`` and ``ferrotunnel client`` pair (the CLI, at
    ``--log-level warning``). ``pure=True``: both with FERROTUNNEL_NO_EXTENSIONS=1; ``tls_dir``:
    TLS 1.3 between them with the certificates there; ``profile``: a path prefix, each end
    profilable with SIGUSR1/SIGUSR2 (see speed_cli.py)."""

    def __init__(self, name: str, procs: Procs, *, pure: bool = False, tls_dir: str = "",
                 server_config: str = "", profile: str = "") -> None:
        super().__init__(name, procs)
        self.pure, self.tls_dir, self.server_config, self.profile = pure, tls_dir, server_config, profile
        self.tunnel_port = 0

    def _env(self, end: str) -> dict:
        env = dict(os.environ, FERROTUNNEL_TOKEN=TOKEN, FERROTUNNEL_LOG_LEVEL="warning")
        for k in ("FERROTUNNEL_NO_EXTENSIONS", "FERROTUNNEL_REQUIRE_EXTENSIONS", "FT_SPEED_PROFILE"):
            env.pop(k, None)
        env["FERROTUNNEL_NO_EXTENSIONS" if self.pure else "FERROTUNNEL_REQUIRE_EXTENSIONS"] = "1"
        if self.server_config and end == "server":
            env["FT_SPEED_SERVER_CONFIG"] = self.server_config
        if self.profile:
            env["FT_SPEED_PROFILE"] = f"{self.profile}-{end}.txt"
        return env

    def start(self, backend_port: int) -> "Tunnel":
        self.stop()
        cli = [sys.executable, os.path.join(HERE, "speed_cli.py")]
        tls_s = ["--tls-cert", f"{self.tls_dir}/server.pem", "--tls-key", f"{self.tls_dir}/server.key"] if self.tls_dir else []
        tls_c = ["--tls", "--tls-ca", f"{self.tls_dir}/ca.pem"] if self.tls_dir else []
        for attempt in range(5):
            # A port free_port() found free can be taken before the server binds it: the load
            # generator's own connections draw source ports from the same ephemeral range (seen
            # once in a --fresh A/B right after a stream-setup run). Then fresh ports, once more.
            self.tunnel_port, self.port = e2e.free_port(), e2e.free_port()
            server = self.procs.popen(f"{self.name}-server", cli + [
                "server", "--bind", f"127.0.0.1:{self.tunnel_port}", "--tcp-bind", f"127.0.0.1:{self.port}",
                "--log-level", "warning", *tls_s], env=self._env("server"))
            try:
                wait_for_line(server, r"TCP ingress on")
            except BenchError:
                if attempt < 4 and "address already in use" in log_tail(server):
                    self.procs.kill(server)
                    continue
                raise
            break
        self.members.append(server)
        client = self.procs.popen(f"{self.name}-client", cli + [
            "client", "--server", f"localhost:{self.tunnel_port}", "--local-addr", f"127.0.0.1:{backend_port}",
            "--log-level", "warning", *tls_c], env=self._env("client"))
        self.members.append(client)
        # (older trees, for an A/B across history, print "connected ...: forwarding streams to" instead)
        wait_for_line(client, r"^Forwarding tcp://|forwarding streams to")
        for p in self.members:  # the implementation asked for is the one loaded
            if compiled_loaded(p.pid) == self.pure:
                raise BenchError(f"{p.bench_name}: the {'pure-Python' if self.pure else 'compiled'} codec was "
                                 f"asked for but not loaded")
        return self


def compiled_loaded(pid: int) -> bool:
    """Whether the process has ferrotunnel's compiled frame codec mapped."""
    with open(f"/proc/{pid}/maps") as f:
        return "ferrotunnel/_frames.cpython" in f.read()


def certs(directory: str) -> str:
    import ferrotunnel as ft

    ft.tls.generate_certs(directory)
    return directory
