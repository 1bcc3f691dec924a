"""The ``ferrotunnel`` command: server, client, certs, demo, version.

Flags and environment variables follow the Rust ``ferrotunnel`` CLI; where the original is unsafe
or surprising this one does the safe thing (see the README). Exit codes: 0 after a clean
shutdown, 2 for usage errors, 1 for runtime failures.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import signal
import os
import sys
from typing import Any, List, Optional, Sequence, Tuple

from .common import UsageError, env, parse_addr, parse_port_flag, parse_port_range_flag
from .parser import build_parser as parser_for, sources
from .tls_flags import client_tls, server_tls
from .certs import add_certs_parser, run_certs
from .public import https_ingress, public_endpoints, public_flags
from .cluster import CLUSTER_HELP, ClusterUsageError, add_cluster_args, cluster_config
from .secrets import TOKEN_HELP, hide_token, token_from_args
from .malloc import tune_malloc

__all__ = ["main"]

log = logging.getLogger("ferrotunnel.cli")



# ------------------------------------------------------------------ the token: see secrets.py


def _setup_logging(level: str) -> None:
    numeric = getattr(logging, level.upper(), None)
    if not isinstance(numeric, int):
        raise UsageError(f"--log-level must be one of debug, info, warning, error; got {level!r}")
    logging.basicConfig(level=numeric, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if _one_terminal():  # a person reads both streams in one place: each event once (the banner)
        for handler in logging.getLogger().handlers:
            handler.addFilter(_Shown())


#: INFO log lines that say what a banner line on stdout says (listening, ingress, connected).
_BANNERED = ("tunnel server listening on ", "%s listening on ", "connected to %s: session ")


class _Shown(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.INFO and isinstance(record.msg, str)
                    and record.msg.startswith(_BANNERED))


def _one_terminal() -> bool:
    """stdout and stderr are one terminal. Files and pipes (scripts, log collectors) keep the log
    lines that repeat the banner: they are an output contract there."""
    try:
        out, err = os.fstat(1), os.fstat(2)
        return os.isatty(1) and os.isatty(2) and (out.st_dev, out.st_ino, out.st_rdev) == (err.st_dev, err.st_ino,
                                                                                          err.st_rdev)
    except OSError:
        return False


def _run(coro: Any) -> int:
    import uvloop

    _raise_fd_limit()
    return uvloop.run(coro)


#: The soft file-descriptor limit the commands ask for when the hard limit allows it.
FD_LIMIT_WANTED = 1 << 16


def _raise_fd_limit() -> None:
    """A tunnel holds a descriptor per visitor: the soft RLIMIT_NOFILE goes up to the hard one (at
    most FD_LIMIT_WANTED), as servers do at start. Never lowered; a refusal is no error."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = FD_LIMIT_WANTED if hard == resource.RLIM_INFINITY else min(hard, FD_LIMIT_WANTED)
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            logging.getLogger("ferrotunnel").debug("file descriptor limit raised from %d to %d", soft, want)
    except (ImportError, ValueError, OSError):
        pass


async def _until_signal(*tasks: "asyncio.Task[Any]") -> Optional["asyncio.Task[Any]"]:
    """Wait for SIGINT/SIGTERM or for one of ``tasks`` to finish; returns the finished task."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({waiter, *tasks}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if stop.is_set():  # from now on (the grace period) a second Ctrl-C ends the process at once (a
        loop.add_signal_handler(signal.SIGINT, _force_exit)  # repeated SIGTERM does not cut the grace short)
    for t in tasks:
        if t in done:
            return t
    return None


def _force_exit() -> None:
    print("ferrotunnel: second signal: exiting now, open streams are cut", file=sys.stderr, flush=True)
    os._exit(130)


# ------------------------------------------------------------------ server


def server_config(trusted_proxies: Sequence[str] = (), limits: Sequence[str] = ()) -> Any:
    """The CLI server's configuration: the library defaults, except that client-opened streams
    are refused at once (the CLI server has no handler for them; the library keeps them on so
    ``Session.accept()`` works), the trusted proxies given and the ``--limit NAME=VALUE``s.
    UsageError (exit 2) for a limit the configuration refuses, with its reason."""
    import ferrotunnel as ft
    from .limits import parse_limits

    chosen = parse_limits(limits)
    try:
        return ft.ServerConfig(accept_client_streams=False, trusted_proxies=tuple(trusted_proxies), **chosen)
    except ValueError as exc:
        if not chosen:
            raise
        raise UsageError(f"--limit: {exc}") from None


def check_server_token(token: str) -> None:
    """UsageError (exit 2) for a shared server token shorter than ``MIN_SERVER_TOKEN_LENGTH``
    (a short secret is guessed; the message says how to make one, never what it was)."""
    from ..auth import MIN_SERVER_TOKEN_LENGTH, NEW_TOKEN_COMMAND

    if len(token) < MIN_SERVER_TOKEN_LENGTH:
        raise UsageError(f"the server token (--token-file, --token, FERROTUNNEL_TOKEN or FERROTUNNEL_TOKEN_FILE) is "
                         f"shorter than {MIN_SERVER_TOKEN_LENGTH} characters, the least a server accepts (as for "
                         f"--client-tokens entries); make a new one, e.g. with: {NEW_TOKEN_COMMAND} > token.txt; "
                         "then pass --token-file token.txt to the server and its clients")


async def _serve(args: argparse.Namespace) -> int:
    import ferrotunnel as ft
    from ..client.client import describe_error, format_address

    tokens = None
    if args.client_tokens:
        from ..server.client_tokens import ClientTokens, TokensFileError

        try:
            tokens = ClientTokens(args.client_tokens)
        except TokensFileError as exc:
            raise UsageError(str(exc)) from None
    shared = args.token or args.token_file or env("FERROTUNNEL_TOKEN") or env("FERROTUNNEL_TOKEN_FILE")
    token = token_from_args(args) if tokens is None or shared else None  # with client tokens it is optional
    if token is not None:
        check_server_token(token)
    bind = parse_addr(args.bind, "--bind")
    ctx, tls_lines = server_tls(args, args.sources)
    tcp_binds: List[Tuple[Tuple[str, int], Optional[str]]] = []
    for spec in args.tcp_bind:
        addr, _, tid = spec.partition("=")
        tcp_binds.append((parse_addr(addr, "--tcp-bind"), tid.lower() or None))  # ids are claimed in lower case
    domain, public_host, public_http_port = public_flags(args)
    http_bind = parse_addr(args.http_bind, "--http-bind") if args.http_bind else None
    port_range = parse_port_range_flag(args.tcp_port_range, "--tcp-port-range")
    metrics_bind = parse_addr(args.metrics_bind, "--metrics-bind") if args.metrics else None

    try:
        cluster = cluster_config(args, bind, parse_addr)
    except ClusterUsageError as exc:
        raise UsageError(str(exc)) from None
    node = None
    if cluster is not None:
        from ..cluster.node import ClusterNode

        node = ClusterNode(*cluster)
    # ports on request: passed only when asked for (a caller's TunnelServer stand-in need not know them)
    ports: Any = dict(tcp_port_range=port_range, tcp_port_host=args.tcp_port_host or None,
                      tcp_port_public_host=public_host) if port_range else {}
    try:
        kind: Any = ft.TunnelServer
        if tokens is not None:
            from ..server.client_tokens import PolicyServer

            kind, ports["client_tokens"] = PolicyServer, tokens
        server = kind(bind, token, tls=ctx, config=server_config(args.trusted_proxy, args.limit),
                      registry=node.registry if node else None, domain=domain, **ports)
        if tokens is not None:  # re-read on SIGHUP; sessions of revoked tokens are closed
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, server.reload_tokens)
    except ValueError as exc:  # a bad --trusted-proxy CIDR
        raise UsageError(str(exc)) from None
    ingresses: List[Any] = [ft.TcpIngress(server, a, tunnel_id=t) for a, t in tcp_binds]
    if http_bind:
        ingresses.append(ft.HttpIngress(server, http_bind, domain=server.domain))
    if args.https_bind:
        ingresses.append(https_ingress(args, server))
    metrics = None
    try:
        if node is not None:
            await node.start()
        for ing in ingresses:  # the public ports first: "listening" is said only once all are bound
            await ing.start()
        await server.start()
        server.public_endpoints = public_endpoints(ingresses, public_host, public_http_port,
                                                   parse_port_flag(args.public_https_port, "--public-https-port") or None)
        if metrics_bind:
            from .metrics import MetricsServer

            metrics = MetricsServer(server, metrics_bind, ingresses, node)
            await metrics.start()
    except OSError as exc:
        for ing in ingresses:
            await ing.close()
        hint = ("is the address one of this machine's?" if exc.errno == errno.EADDRNOTAVAIL
                else "is another process using the port?" if exc.errno == errno.EADDRINUSE else "")
        print(f"ferrotunnel: cannot listen: {describe_error(exc)}{'; ' + hint if hint else ''}", file=sys.stderr)
        await server.close()
        if node is not None:
            await node.close()
        return 1
    except RuntimeError as exc:
        print(f"ferrotunnel: {describe_error(exc)}", file=sys.stderr)
        await server.close()
        return 1
    # "listening on ADDR" is part of the output contract: operators' scripts wait for it
    print(f"ferrotunnel server listening on {format_address(*server.address)}{' (TLS)' if ctx else ''}", flush=True)
    for line in tls_lines:
        print(line, flush=True)
    for ing in ingresses:
        kind = "HTTP" if isinstance(ing, ft.HttpIngress) else "TCP"
        by_host = f"by Host header (ID.{server.domain} or ID)" if server.domain else "by Host header"
        target = getattr(ing, "tunnel_id", None) or (by_host if kind == "HTTP" else "first tcp client")
        print(f"{kind} ingress on {format_address(*ing.address)} -> {target}", flush=True)
    if port_range is not None:
        print(f"TCP ports on request on {server.ports.describe()} -> the client that asks (--remote-port)", flush=True)
    if not ingresses and port_range is None and node is None:
        print("note: no ingress: visitors cannot reach any tunnel; add --http-bind, --https-bind, --tcp-bind or "
              "--tcp-port-range", flush=True)
    if metrics is not None:
        print(f"metrics on http://{metrics.address[0]}:{metrics.address[1]}/metrics", flush=True)
    await _until_signal()
    print(f"shutting down (up to {args.grace:.0f}s for open streams)", flush=True)
    server.stop_listening()  # at once: a balancer's health checks take this node out
    for ing in ingresses:
        ing.stop_listening()
    if node is not None:
        await node.drain()  # the other nodes may take this node's tunnels over from now on
    # clients that can are told to move to another node now; streams in flight finish here
    await server.shutdown(args.grace, handover=node is not None, busy=node.busy if node else None)
    for ing in ingresses:
        await ing.close()
    if node is not None:
        await node.close()
    if metrics is not None:
        await metrics.close()
    return 0


# ------------------------------------------------------------------ client


async def _connect(args: argparse.Namespace) -> int:
    from ..client.client import describe_error
    from .config_run import run_config, serve_tunnels, spec_from_flags

    if args.config:
        return await run_config(args, token_from_args=token_from_args, client_tls=lambda a: client_tls(a, a.sources),
                                until_signal=_until_signal, describe_error=describe_error, host_hint=host_hint)
    token = token_from_args(args)
    if not args.server:
        raise UsageError("--server HOST:PORT is required (or FERROTUNNEL_SERVER)")
    parse_addr(args.server, "--server")
    spec = spec_from_flags(args)
    ctx, tls_lines = client_tls(args, args.sources)
    return await serve_tunnels([spec], args.server, token, (ctx, tls_lines), args.tls_server_name, args=args,
                               until_signal=_until_signal, describe_error=describe_error, host_hint=host_hint,
                               token_hint="the client's token (--token-file, FERROTUNNEL_TOKEN or --token) must "
                                          "equal the server's", name_tunnels=False)


def host_hint(url: str, tunnel_id: str) -> str:
    """For an http URL whose host name does not carry the tunnel id (a server without --domain):
    the Host header visitors must send."""
    from urllib.parse import urlsplit

    if not url.startswith(("http://", "https://")):
        return ""
    try:
        host = urlsplit(url).hostname or ""
    except ValueError:
        return ""
    tid = tunnel_id.lower()
    return "" if host == tid or host.startswith(tid + ".") else f" (visitors send Host: {tid})"


# ------------------------------------------------------------------ certs, version, demo


def _version() -> int:
    import platform

    import ferrotunnel as ft
    from ..frames import IMPLEMENTATION

    impl = "compiled" if IMPLEMENTATION == "c" else "pure Python"
    print(f"ferrotunnel {ft.__version__} (FerroTunnel protocol v1, {impl} codec, Python "
          f"{platform.python_version()}, {platform.system()} {platform.machine()})")
    return 0


async def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return await run_demo(requests=args.requests, concurrency=args.concurrency, cluster=args.cluster)


# ------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    """The command's parser (see ``parser.build_parser``)."""
    return parser_for(token_help=TOKEN_HELP, cluster_help=CLUSTER_HELP, add_cluster_args=add_cluster_args,
                      add_certs_parser=add_certs_parser, version=_version)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line. With ``argv`` None (the real command) a --token is moved out of the
    process list by re-executing; an explicit ``argv`` (a caller in-process) is never re-executed."""
    parser = build_parser()
    real = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.sources = sources(args, argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        if real and args.command in ("server", "client"):
            hide_token(args, argv)  # before anything else: no socket is open yet
            tune_malloc()  # (our own process: see cli/malloc.py)
        if args.command == "version":
            return _version()
        if args.command == "certs":
            return run_certs(args)
        if args.command == "demo":
            _setup_logging("warning")
            return _run(_demo(args))
        _setup_logging(args.log_level)
        if args.command == "server":
            return _run(_serve(args))
        return _run(_connect(args))
    except UsageError as exc:
        print(f"ferrotunnel {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
