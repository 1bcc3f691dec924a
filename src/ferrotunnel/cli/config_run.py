"""``ferrotunnel client --config FILE.toml``: every tunnel of the file served from one process,
one connection per tunnel, each printing its ``connected`` and ``Forwarding`` lines as the
single-tunnel client does. Flags and environment variables win over the file; a single-tunnel
flag (``--tunnel-id``, ``--local-addr``, ``--remote-port``, ``--proxy-protocol``) applies to a file
with one tunnel only.
The first tunnel that fails for good ends the process with exit 1, saying which tunnel and why."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any, Awaitable, Callable, List, Optional, Tuple

from .common import UsageError, env, parse_addr, parse_port_flag
from .config_file import ClientFile, TunnelSpec, load_client_file

__all__ = ["run_config"]


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
    from .. import tls

    if args.tls or args.tls_ca or args.tls_skip_verify or args.tls_cert or args.tls_key or args.tls_server_name:
        return client_tls(args), args.tls_server_name
    t = cfg.tls
    if t is None:
        return None, None
    return tls.client_context(t.ca, skip_verify=t.skip_verify, certfile=t.cert, keyfile=t.key), t.server_name


def _tunnels(args: argparse.Namespace, cfg: ClientFile) -> List[TunnelSpec]:
    specs = list(cfg.tunnels)
    given = [f for f, v in (("--tunnel-id", args.tunnel_id), ("--local-addr", args.local_addr),
                            ("--remote-port", args.remote_port), ("--proxy-protocol", args.proxy_protocol))
             if v is not None]
    if not given:
        return specs
    if len(specs) != 1:
        raise UsageError(f"{', '.join(given)} apply to one tunnel; {cfg.path} names {len(specs)}: set them in the file")
    spec = specs[0]
    local = parse_addr(args.local_addr, "--local-addr") if args.local_addr is not None else spec.local
    port = parse_port_flag(args.remote_port, "--remote-port") if args.remote_port is not None else spec.remote_port
    return [TunnelSpec(args.tunnel_id or spec.id, local, port, args.proxy_protocol or spec.proxy_protocol)]


async def run_config(args: argparse.Namespace, *, token_from_args: Callable[[argparse.Namespace], str],
                     client_tls: Callable[[argparse.Namespace], Any],
                     until_signal: Callable[..., Awaitable[Optional["asyncio.Task[Any]"]]],
                     describe_error: Callable[[BaseException], str],
                     host_hint: Callable[[str, str], str]) -> int:
    """The ``client`` command with ``--config``; the command passes its own helpers in."""
    import ferrotunnel as ft
    from ..client.client import format_address

    cfg = load_client_file(args.config)
    server = args.server or cfg.server
    if not server:
        raise UsageError(f"no server: set server = \"HOST:PORT\" in {cfg.path}, or pass --server")
    parse_addr(server, "--server")
    token = _token(args, cfg, token_from_args)
    ctx, server_name = _tls(args, cfg, client_tls)
    specs = _tunnels(args, cfg)
    clients: List[Any] = []
    tasks: List["asyncio.Task[Any]"] = []
    for spec in specs:
        client = ft.TunnelClient(server, token, tunnel_id=spec.id, tls=ctx, server_name=server_name,
                                 config=ft.ClientConfig(local_addr=spec.local, remote_port=spec.remote_port,
                                                        proxy_protocol=spec.proxy_protocol))
        local = format_address(*spec.local)

        def connected(session: Any, client: Any = client, local: str = local) -> None:
            print(f"connected to {client.address}: session {session.id}, tunnel id {client.tunnel_id}; "
                  f"forwarding streams to {local}", flush=True)

        def public(urls: Tuple[str, ...], client: Any = client, local: str = local) -> None:
            for url in urls:
                print(f"Forwarding {url} -> {local}{host_hint(url, client.tunnel_id)}", flush=True)

        clients.append(client)
        tasks.append(asyncio.ensure_future(client.connect_and_run(on_connected=connected, on_public_urls=public)))
    try:
        finished = await until_signal(*tasks)
        if finished is None:
            print("shutting down", flush=True)
            return 0
        exc = finished.exception()
        if exc is None:
            return 0
        who = clients[tasks.index(finished)].tunnel_id
        hint = ""
        if isinstance(exc, ft.AuthenticationError) and "not allowed for this token" not in str(exc):
            hint = f"; the token (flags, environment or {cfg.path}) must equal the server's"
        print(f"ferrotunnel: tunnel {who}: {describe_error(exc)}{hint}", file=sys.stderr)
        return 1
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
