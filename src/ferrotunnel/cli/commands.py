"""The ``ferrotunnel`` command: server, client, certs, demo, version.

Flags and environment variables follow the Rust ``ferrotunnel`` CLI; where the original is unsafe
or surprising this one does the safe thing (see the README). Exit codes: 0 after a clean
shutdown, 2 for usage errors, 1 for runtime failures.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import textwrap
from typing import Any, List, Optional, Sequence, Tuple

from .common import (DEFAULT_LOCAL, UsageError, env, env_flag, existing_file, parse_addr, parse_port_flag,
                     parse_port_range_flag)
from .certs import add_certs_parser, run_certs
from .public import https_ingress, public_endpoints, public_flags
from .cluster import CLUSTER_HELP, ClusterUsageError, add_cluster_args, cluster_config
from .secrets import TOKEN_HELP, hide_token, token_from_args

__all__ = ["main"]

log = logging.getLogger("ferrotunnel.cli")

DEFAULT_BIND = "0.0.0.0:7835"


# ------------------------------------------------------------------ the token: see secrets.py


def _setup_logging(level: str) -> None:
    numeric = getattr(logging, level.upper(), None)
    if not isinstance(numeric, int):
        raise UsageError(f"--log-level must be one of debug, info, warning, error; got {level!r}")
    logging.basicConfig(level=numeric, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


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
    for t in tasks:
        if t in done:
            return t
    return None


# ------------------------------------------------------------------ server


def _server_tls(args: argparse.Namespace) -> Any:
    from .. import tls

    cert, key = args.tls_cert, args.tls_key
    if not cert and not key:
        if args.tls_ca or args.tls_client_auth:
            raise UsageError("--tls-ca and --tls-client-auth need --tls-cert and --tls-key")
        return None
    if not (cert and key):
        raise UsageError("TLS needs both --tls-cert and --tls-key")
    existing_file(cert, "--tls-cert")
    existing_file(key, "--tls-key")
    existing_file(args.tls_ca, "--tls-ca")
    if args.tls_client_auth and not args.tls_ca:
        raise UsageError("--tls-client-auth needs --tls-ca (the CA that signs client certificates)")
    # as in the original, a CA means client certificates are required (mutual TLS)
    return tls.server_context(cert, key, args.tls_ca, require_client_cert=bool(args.tls_ca))


def server_config(trusted_proxies: Sequence[str] = ()) -> Any:
    """The CLI server's configuration: the library defaults, except that client-opened streams
    are refused at once (the CLI server has no handler for them; the library keeps them on so
    ``Session.accept()`` works), and the trusted proxies given."""
    import ferrotunnel as ft

    return ft.ServerConfig(accept_client_streams=False, trusted_proxies=tuple(trusted_proxies))


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
    bind = parse_addr(args.bind, "--bind")
    ctx = _server_tls(args)
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
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, tokens.reload)  # re-read on SIGHUP
        server = kind(bind, token, tls=ctx, config=server_config(args.trusted_proxy),
                      registry=node.registry if node else None, domain=domain, **ports)
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
        await server.start()
        for ing in ingresses:
            await ing.start()
        server.public_endpoints = public_endpoints(ingresses, public_host, public_http_port,
                                                   parse_port_flag(args.public_https_port, "--public-https-port") or None)
        if metrics_bind:
            from .metrics import MetricsServer

            metrics = MetricsServer(server, metrics_bind, ingresses, node)
            await metrics.start()
    except OSError as exc:
        print(f"ferrotunnel: cannot listen: {describe_error(exc)}. Is another process using the port?", file=sys.stderr)
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
    for ing in ingresses:
        kind = "HTTP" if isinstance(ing, ft.HttpIngress) else "TCP"
        by_host = f"by Host header (ID.{server.domain} or ID)" if server.domain else "by Host header"
        target = getattr(ing, "tunnel_id", None) or (by_host if kind == "HTTP" else "first tcp client")
        print(f"{kind} ingress on {format_address(*ing.address)} -> {target}", flush=True)
    if port_range is not None:
        print(f"TCP ports on request on {server.ports.describe()} -> the client that asks (--remote-port)", flush=True)
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


def _client_tls(args: argparse.Namespace) -> Any:
    from .. import tls

    wants = args.tls or args.tls_ca or args.tls_skip_verify or args.tls_cert or args.tls_key or args.tls_server_name
    if not wants:
        return None
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("a client certificate needs both --tls-cert and --tls-key")
    existing_file(args.tls_ca, "--tls-ca")
    existing_file(args.tls_cert, "--tls-cert")
    existing_file(args.tls_key, "--tls-key")
    # unlike the original, no CA means the system trust store, never silently no verification
    return tls.client_context(args.tls_ca, skip_verify=args.tls_skip_verify, certfile=args.tls_cert,
                              keyfile=args.tls_key)


async def _connect(args: argparse.Namespace) -> int:
    from ..client.client import describe_error
    from .config_run import run_config, serve_tunnels, spec_from_flags

    if args.config:
        return await run_config(args, token_from_args=token_from_args, client_tls=_client_tls,
                                until_signal=_until_signal, describe_error=describe_error, host_hint=host_hint)
    token = token_from_args(args)
    if not args.server:
        raise UsageError("--server HOST:PORT is required (or FERROTUNNEL_SERVER)")
    parse_addr(args.server, "--server")
    spec = spec_from_flags(args)
    return await serve_tunnels([spec], args.server, token, _client_tls(args), args.tls_server_name,
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


# ------------------------------------------------------------------ parser

#: Where a client forwards its streams without --local-addr (or a config file).


def _token_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token-file", default=None, metavar="PATH",
                   help="read the tunnel token from the first line of PATH (or FERROTUNNEL_TOKEN_FILE)")
    p.add_argument("--token", default=None,
                   help="the tunnel token; visible in the process list until start-up moves it out: prefer "
                        "--token-file or FERROTUNNEL_TOKEN (precedence below)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ferrotunnel", description="Expose a local TCP or HTTP service through a "
                                "FerroTunnel-compatible reverse tunnel.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("server", help="run the tunnel server and its public ingresses",
                       epilog=textwrap.fill(TOKEN_HELP, 100) + "\n\n" + CLUSTER_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--bind", default=env("FERROTUNNEL_BIND", DEFAULT_BIND), help="tunnel listener (default %(default)s)")
    _token_flags(s)
    s.add_argument("--http-bind", default=env("FERROTUNNEL_HTTP_BIND"),
                   help="HTTP ingress routed by Host (off unless given)")
    s.add_argument("--domain", default=env("FERROTUNNEL_DOMAIN"),
                   help="visitors reach tunnel ID as ID.DOMAIN at the HTTP ingress (a bare Host: ID still works); "
                        "tunnel ids must then be DNS labels")
    s.add_argument("--public-host", default=env("FERROTUNNEL_PUBLIC_HOST"),
                   help="host name the URLs told to clients show (behind a balancer); default: the domain, else the "
                        "ingress's bind host")
    s.add_argument("--public-http-port", default=env("FERROTUNNEL_PUBLIC_HTTP_PORT"), metavar="PORT",
                   help="port the http:// URLs show (default: the HTTP ingress's bound port)")
    s.add_argument("--https-bind", default=env("FERROTUNNEL_HTTPS_BIND"),
                   help="HTTPS ingress (TLS for visitors), routed by SNI then Host (off unless given)")
    s.add_argument("--https-cert", default=env("FERROTUNNEL_HTTPS_CERT"), help="its certificate (PEM; a wildcard "
                   "for the domain, e.g. from ferrotunnel certs --domain)")
    s.add_argument("--https-key", default=env("FERROTUNNEL_HTTPS_KEY"), help="its private key (PEM)")
    s.add_argument("--public-https-port", default=env("FERROTUNNEL_PUBLIC_HTTPS_PORT"), metavar="PORT",
                   help="the HTTPS port printed URLs show (default: the bound one)")
    s.add_argument("--tcp-bind", action="append", metavar="ADDR[=TUNNEL_ID]",
                   default=[x for x in (env("FERROTUNNEL_TCP_BIND") or "").split(",") if x],
                   help="TCP ingress; repeatable; without =TUNNEL_ID the first tcp client gets it")
    s.add_argument("--tcp-port-range", default=env("FERROTUNNEL_TCP_PORT_RANGE"), metavar="LO-HI",
                   help="ports clients may ask for (client --remote-port), each a TCP ingress of its own while the "
                        "client is connected (off unless given)")
    s.add_argument("--tcp-port-host", default=env("FERROTUNNEL_TCP_PORT_HOST"), metavar="HOST",
                   help="where those ports are bound (default: the host of --bind)")
    s.add_argument("--tls-cert", default=env("FERROTUNNEL_TLS_CERT"))
    s.add_argument("--tls-key", default=env("FERROTUNNEL_TLS_KEY"))
    s.add_argument("--tls-ca", default=env("FERROTUNNEL_TLS_CA"), help="require client certificates signed by this CA")
    s.add_argument("--tls-client-auth", action="store_true", default=env_flag("FERROTUNNEL_TLS_CLIENT_AUTH"))
    s.add_argument("--metrics", action="store_true", default=env_flag("FERROTUNNEL_METRICS"),
                   help="serve Prometheus metrics (needs ferrotunnel[metrics])")
    s.add_argument("--metrics-bind", default=env("FERROTUNNEL_METRICS_BIND", "127.0.0.1:9090"))
    s.add_argument("--client-tokens", default=env("FERROTUNNEL_CLIENT_TOKENS"), metavar="FILE.toml",
                   help="per-client tokens, each with the tunnel ids it may claim ([[token]] token or sha256, "
                        "tunnels = globs); re-read on SIGHUP; the shared token becomes optional")
    s.add_argument("--grace", type=float, default=10.0, help="seconds open streams get on SIGTERM (default 10)")
    s.add_argument("--trusted-proxy", action="append", metavar="CIDR",
                   default=[x for x in (env("FERROTUNNEL_TRUSTED_PROXY") or "").split(",") if x],
                   help="a balancer whose PROXY protocol v2 header names the real client (repeatable; env "
                        "FERROTUNNEL_TRUSTED_PROXY, comma-separated); a header from any other address is refused")
    s.add_argument("--log-level", default=env("FERROTUNNEL_LOG_LEVEL", "info"))
    add_cluster_args(s)

    c = sub.add_parser("client", help="connect to a server and forward its streams to a local service",
                       epilog=TOKEN_HELP)
    c.add_argument("--server", default=env("FERROTUNNEL_SERVER"), help="HOST:PORT of the tunnel server")
    _token_flags(c)
    c.add_argument("--config", default=env("FERROTUNNEL_CONFIG"), metavar="FILE.toml",
                   help="serve every [[tunnel]] of a TOML file (server, token_file or token, [tls], [[tunnel]] id, "
                        "local, remote_port); flags and environment variables win over the file")
    c.add_argument("--local-addr", default=env("FERROTUNNEL_LOCAL_ADDR"),
                   help=f"the local service as HOST:PORT (default {DEFAULT_LOCAL})")
    c.add_argument("--tunnel-id", default=env("FERROTUNNEL_TUNNEL_ID"),
                   help="the name to route by (HTTP Host, or =TUNNEL_ID on a TCP ingress)")
    c.add_argument("--proxy-protocol", choices=("v1", "v2"), default=env("FERROTUNNEL_PROXY_PROTOCOL"),
                   help="send the local service a PROXY protocol header (v1 text, v2 binary) naming each visitor "
                        "(the server passes its address: visitor-addr/1); default: none")
    c.add_argument("--remote-port", default=env("FERROTUNNEL_REMOTE_PORT"), metavar="N",
                   help="ask the server for public TCP port N of its --tcp-port-range (0: any free one) for this "
                        "tunnel while connected")
    c.add_argument("--protocol", choices=("http", "tcp"), default=env("FERROTUNNEL_PROTOCOL"),
                   help="serve the tunnel only at the server's HTTP/HTTPS ingresses (http) or only at TCP ones "
                        "(tcp); default: both")
    c.add_argument("--basic-auth", default=env("FERROTUNNEL_BASIC_AUTH"), metavar="USER:PASSWORD",
                   help="HTTP visitors must send these credentials (401 until they do); prefer the environment "
                        "variable FERROTUNNEL_BASIC_AUTH: other users can read a command line")
    c.add_argument("--allow", action="append", metavar="CIDR",
                   default=[x for x in (env("FERROTUNNEL_ALLOW") or "").split(",") if x],
                   help="only visitors from this network reach the tunnel (repeatable; env FERROTUNNEL_ALLOW, "
                        "comma-separated); default: any")
    c.add_argument("--pool", action="store_true", default=env_flag("FERROTUNNEL_POOL"),
                   help="serve the tunnel id together with other clients that pass --pool (visitors are spread "
                        "over them)")
    c.add_argument("--tls", action="store_true", default=env_flag("FERROTUNNEL_TLS"))
    c.add_argument("--tls-ca", default=env("FERROTUNNEL_TLS_CA"))
    c.add_argument("--tls-server-name", default=env("FERROTUNNEL_TLS_SERVER_NAME"))
    c.add_argument("--tls-skip-verify", action="store_true", default=env_flag("FERROTUNNEL_TLS_SKIP_VERIFY"),
                   help="accept any server certificate (unsafe; never implied)")
    c.add_argument("--tls-cert", default=env("FERROTUNNEL_TLS_CERT"))
    c.add_argument("--tls-key", default=env("FERROTUNNEL_TLS_KEY"))
    c.add_argument("--log-level", default=env("FERROTUNNEL_LOG_LEVEL", "info"))

    add_certs_parser(sub)

    d = sub.add_parser("demo", help="server, client and a small HTTP app in one process, with traffic")
    d.add_argument("--requests", type=int, default=300)
    d.add_argument("--concurrency", type=int, default=8)
    d.add_argument("--cluster", action="store_true", help="three cluster nodes, redis-server and haproxy (from PATH) "
                   "on loopback, with traffic and a node failover (docs/cluster.md)")

    sub.add_parser("version", help="print the version")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line. With ``argv`` None (the real command) a --token is moved out of the
    process list by re-executing; an explicit ``argv`` (a caller in-process) is never re-executed."""
    parser = build_parser()
    real = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        if real and args.command in ("server", "client"):
            hide_token(args, argv)  # before anything else: no socket is open yet
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
