"""``ferrotunnel client --config FILE.toml``: every tunnel of the file served from one process,
on one connection when the server negotiates ``tunnels/1`` (one connection per tunnel when it
does not), each printing its ``connected`` and ``Forwarding`` lines; the
single-tunnel client (no file) runs the same way with one tunnel made of its flags. Flags and
environment variables win over the file; a single-tunnel flag (``SINGLE_FLAGS``) applies to a
file with one tunnel only.
The first tunnel that fails for good ends the process with exit 1, saying which tunnel and why."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import time
import sys
from typing import Any, Awaitable, Callable, List, Optional, Tuple

from .common import DEFAULT_LOCAL, UsageError, env, parse_addr, parse_port_flag
from .config_file import ClientFile, TunnelSpec, load_client_file

__all__ = ["run_config", "serve_tunnels", "spec_from_flags", "SINGLE_FLAGS"]

log = logging.getLogger("ferrotunnel.client")


def _token(args: argparse.Namespace, cfg: ClientFile, token_from_args: Callable[[argparse.Namespace], str]) -> str:
    from ..auth import TokenFormatError, validate_token_format
    from .secrets import read_token_file

    if args.token is not None or args.token_file is not None or env("FERROTUNNEL_TOKEN") or env("FERROTUNNEL_TOKEN_FILE"):
        return token_from_args(args)
    if cfg.token is not None:
        token, source = cfg.token, f"token in {cfg.path}"
    elif cfg.token_file is not None:
        token, source = read_token_file(cfg.token_file, f"token_file in {cfg.path}"), f"token_file in {cfg.path}"
    else:
        return token_from_args(args)  # the prompt, or the usual "no token" usage error
    try:
        validate_token_format(token)
    except TokenFormatError as exc:
        raise UsageError(f"invalid token (from {source}): {exc}") from None
    return token


def _tls(args: argparse.Namespace, cfg: ClientFile, client_tls: Callable[[argparse.Namespace], Any]) -> Tuple[Any, Optional[str]]:
    """((SSL context or None, banner lines), server name): the flags' TLS, else the file's [tls]."""
    from .tls_flags import client_tls as file_tls

    if args.tls or args.tls_ca or args.tls_skip_verify or args.tls_cert or args.tls_key or args.tls_server_name:
        return client_tls(args), args.tls_server_name
    t = cfg.tls
    if t is None:
        return client_tls(args), None  # TLS off, said so
    ns = argparse.Namespace(tls=True, tls_ca=t.ca, tls_skip_verify=t.skip_verify, tls_cert=t.cert, tls_key=t.key,
                            tls_server_name=t.server_name)
    where = f"[tls] of {cfg.path}"
    return file_tls(ns, {k: where for k in ("tls_ca", "tls_skip_verify", "tls_cert", "tls_key")}), t.server_name


#: The single-tunnel flags (argparse dest, flag); each applies to a file with one tunnel only.
SINGLE_FLAGS = (("tunnel_id", "--tunnel-id"), ("local_addr", "--local-addr"), ("remote_port", "--remote-port"),
                ("proxy_protocol", "--proxy-protocol"), ("protocol", "--protocol"), ("basic_auth", "--basic-auth"),
                ("allow", "--allow"), ("pool", "--pool"))


def spec_from_flags(args: argparse.Namespace, base: Optional[TunnelSpec] = None) -> TunnelSpec:
    """A tunnel from the flags (and their environment variables), over ``base`` (a file's only
    tunnel) where they are not given. UsageError for a bad value or settings that do not go together."""
    from ..access import check_basic_auth_value, parse_networks

    default = base or TunnelSpec(None, parse_addr(DEFAULT_LOCAL, "--local-addr"))
    local = parse_addr(args.local_addr, "--local-addr") if args.local_addr is not None else default.local
    port = parse_port_flag(args.remote_port, "--remote-port") if args.remote_port is not None else default.remote_port
    for value, flag, choices in ((args.proxy_protocol, "--proxy-protocol", ("v1", "v2")),
                                 (args.protocol, "--protocol", ("http", "tcp"))):
        if value is not None and value not in choices:  # an environment value skips argparse's choices
            raise UsageError(f"{flag} must be {' or '.join(choices)}, got {value!r}")
    auth = args.basic_auth if args.basic_auth is not None else default.basic_auth
    if getattr(args, "sources", {}).get("basic_auth") == "--basic-auth":
        print("ferrotunnel client: WARNING: the password given with --basic-auth is visible to local users in the "
              "process list; use FERROTUNNEL_BASIC_AUTH or basic_auth in a config file", file=sys.stderr, flush=True)
    allow = tuple(args.allow) if args.allow else default.allow
    try:
        if auth is not None:
            check_basic_auth_value(auth)
        parse_networks(allow)
    except ValueError as exc:  # the message never repeats the password
        raise UsageError(f"--basic-auth/--allow: {exc}") from None
    spec = TunnelSpec(args.tunnel_id or default.id, local, port, args.proxy_protocol or default.proxy_protocol,
                      args.protocol or default.protocol, auth, allow, bool(args.pool) or default.pool)
    try:
        spec.client_config()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return spec


def _tunnels(args: argparse.Namespace, cfg: ClientFile) -> List[TunnelSpec]:
    specs = list(cfg.tunnels)
    given = [flag for dest, flag in SINGLE_FLAGS if getattr(args, dest) not in (None, False, [], ())]
    if not given:
        return specs
    if len(specs) != 1:
        raise UsageError(f"{', '.join(given)} apply to one tunnel; {cfg.path} names {len(specs)}: set them in the file")
    return [spec_from_flags(args, specs[0])]


async def run_config(args: argparse.Namespace, *, token_from_args: Callable[[argparse.Namespace], str],
                     client_tls: Callable[[argparse.Namespace], Any],
                     until_signal: Callable[..., Awaitable[Optional["asyncio.Task[Any]"]]],
                     describe_error: Callable[[BaseException], str],
                     host_hint: Callable[[str, str], str]) -> int:
    """The ``client`` command with ``--config``; the command passes its own helpers in."""
    cfg = load_client_file(args.config)
    server = args.server or cfg.server
    if not server:
        raise UsageError(f"no server: set server = \"HOST:PORT\" in {cfg.path}, or pass --server")
    parse_addr(server, "--server")
    token = _token(args, cfg, token_from_args)
    ctx, server_name = _tls(args, cfg, client_tls)
    return await serve_tunnels(_tunnels(args, cfg), server, token, ctx, server_name, args=args,
                               until_signal=until_signal,
                               describe_error=describe_error, host_hint=host_hint,
                               token_hint=f"the token (flags, environment or {cfg.path}) must equal the server's",
                               name_tunnels=True)


async def serve_tunnels(specs: List[TunnelSpec], server: str, token: str, tls: Tuple[Any, List[str]],
                        server_name: Optional[str], *, args: argparse.Namespace,
                        until_signal: Callable[..., Awaitable[Optional["asyncio.Task[Any]"]]],
                        describe_error: Callable[[BaseException], str], host_hint: Callable[[str, str], str],
                        token_hint: str, name_tunnels: bool) -> int:
    """Serve ``specs`` on one connection (one each when the server cannot carry several), printing each tunnel's ``connected`` and
    ``Forwarding`` lines (an output contract), until a signal (exit 0) or the first tunnel that
    fails for good (exit 1, saying why; ``name_tunnels``: the message names the tunnel). ``tls``:
    the SSL context (None: plaintext) and the lines that say the TLS mode. After a signal, open
    streams get ``args.grace`` seconds; ``args.max_retries`` failed attempts in a row end a tunnel."""
    import ferrotunnel as ft
    from ..client.client import format_address

    ctx, tls_lines = tls
    for line in tls_lines:
        print(line, file=sys.stderr if line.startswith("warning:") else sys.stdout, flush=True)
    backoff = ft.BackoffConfig(max_attempts=args.max_retries) if args.max_retries else None
    inspector = await _start_inspector(args)

    clients: List[Any] = []
    tasks: List["asyncio.Task[Any]"] = []
    started = asyncio.Event()  # a tunnel was started (a fallback to a connection of its own)

    def handler_for(tunnel_id: str, config: Any) -> Any:  # (the id the client has: its own if none was asked)
        return (inspector.handler(config.local_addr, tunnel_id, proxy_protocol=config.proxy_protocol)
                if inspector is not None else None)

    def config_of(spec: TunnelSpec) -> Any:
        config = dataclasses.replace(spec.client_config(), max_connects_in_flight=args.max_connects_in_flight)
        return dataclasses.replace(config, backoff=backoff) if backoff is not None else config

    def start(spec: TunnelSpec, more: Tuple[TunnelSpec, ...] = ()) -> None:
        config = config_of(spec)
        extra = [ft.Tunnel(m.id, config_of(m), handler_for(m.id, config_of(m))) for m in more if m.id]
        client = ft.TunnelClient(server, token, tunnel_id=spec.id, tls=ctx, server_name=server_name, config=config,
                                 more_tunnels=extra)
        local = format_address(*spec.local)
        rest = tuple(m for m in more if m.id)

        def say(tunnel_id: str, session: Any, local: str, urls: Tuple[str, ...]) -> None:
            print(f"connected to {client.address}: session {session.id}, tunnel id {tunnel_id}; "
                  f"forwarding streams to {local}", flush=True)
            for url in urls:
                print(f"Forwarding {url} -> {local}{host_hint(url, tunnel_id)}", flush=True)

        def connected(session: Any) -> None:
            print(f"connected to {client.address}: session {session.id}, tunnel id {client.tunnel_id}; "
                  f"forwarding streams to {local}", flush=True)
            if rest and client.more_tunnels and not client.carries_more_tunnels:
                # the server cannot carry them (a Rust one, an older one): a connection each
                log.info("the server at %s does not serve several tunnels on one connection (tunnels/1): "
                         "one connection per tunnel", client.address)
                client.carry_alone()
                for m in rest:
                    start(m)

        def public(urls: Tuple[str, ...]) -> None:
            for url in urls:
                print(f"Forwarding {url} -> {local}{host_hint(url, client.tunnel_id)}", flush=True)

        def registered(t: Any, urls: Tuple[str, ...]) -> None:
            session = client.session
            if session is not None:
                say(t.tunnel_id, session, format_address(*t.config.local_addr), urls)

        clients.append(client)
        tasks.append(asyncio.ensure_future(client.connect_and_run(handler_for(client.tunnel_id, config), on_connected=connected,
                                                                  on_public_urls=public, on_registered=registered)))
        started.set()

    # every tunnel on the first one's connection (tunnels without an id get a connection each:
    # their ids are the server's choice)
    named = [s for s in specs if s.id]
    if len(named) > 1:
        start(named[0], tuple(named[1:]))
        for spec in specs:
            if not spec.id:
                start(spec)
    else:
        for spec in specs:
            start(spec)
    watch = asyncio.ensure_future(_first_to_end(tasks, started))
    try:
        ended = await until_signal(watch)
        finished = watch.result() if ended is not None else None
        if finished is None:
            await _grace(clients, tasks, args.grace)
            return 0
        exc = finished.exception()
        if exc is None:
            return 0
        who = f"tunnel {getattr(exc, 'tunnel_id', None) or clients[tasks.index(finished)].tunnel_id}: " \
            if name_tunnels else ""
        hint = ""
        if isinstance(exc, ft.AuthenticationError) and "not allowed for this token" not in str(exc):
            hint = f"; {token_hint}"
        print(f"ferrotunnel: {who}{describe_error(exc)}{hint}", file=sys.stderr)
        return 1
    finally:
        watch.cancel()
        for t in tasks:
            t.cancel()
        await asyncio.gather(watch, *tasks, return_exceptions=True)
        if inspector is not None:
            await inspector.close()


async def _first_to_end(tasks: List["asyncio.Task[Any]"], started: asyncio.Event) -> "asyncio.Task[Any]":
    """The first of ``tasks`` to end (the list may grow while waiting: ``started`` says so)."""
    while True:
        started.clear()
        grown = asyncio.ensure_future(started.wait())
        try:
            done, _ = await asyncio.wait([*tasks, grown], return_when=asyncio.FIRST_COMPLETED)
        finally:
            grown.cancel()
        for t in tasks:
            if t in done:
                return t


async def _start_inspector(args: argparse.Namespace) -> Any:
    """The request inspector of ``--inspect HOST:PORT`` (None without it); UsageError when it
    cannot start."""
    if not getattr(args, "inspect", None):
        return None
    from ..client.inspect import Inspector

    addr = parse_addr(args.inspect, "--inspect")
    try:
        inspector = Inspector(addr, max_connects_in_flight=getattr(args, "max_connects_in_flight", 256))
        await inspector.start()
    except ValueError as exc:
        raise UsageError(f"--inspect: {exc}") from None
    except OSError as exc:
        raise UsageError(f"--inspect {args.inspect}: cannot listen: {exc.strerror or exc}") from None
    print(f"Inspector on {inspector.url} (the requests through this client's tunnels)", flush=True)
    return inspector


async def _grace(clients: List[Any], tasks: List["asyncio.Task[Any]"], grace: float) -> None:
    """After a signal: open streams may finish for up to ``grace`` seconds (a second signal ends
    the process at once), then every connection closes."""
    def open_streams() -> int:  # (a session being replaced after a hand-over counts too)
        return sum(c.open_streams for c in clients)

    print(f"shutting down (up to {grace:g}s for {open_streams()} open streams)", flush=True)
    deadline = time.monotonic() + grace
    while open_streams() and time.monotonic() < deadline and not all(t.done() for t in tasks):
        await asyncio.sleep(0.05)
