"""The ``ferrotunnel`` command line: every subcommand and flag, each flag with its help text, its
environment variable(s) and its default, and a way to tell afterwards which flag or variable
supplied a value (the banners say where each TLS file came from).

Environment variables: a flag given on the command line wins; otherwise the first variable of its
list that is set; otherwise the default. The Rust CLI's names keep their per-command meaning
(``FERROTUNNEL_TLS_CA`` on the server requires client certificates, as there); the
``FERROTUNNEL_SERVER_TLS_*`` and ``FERROTUNNEL_CLIENT_TLS_*`` names come first, so one shell can
hold both sides' files."""

from __future__ import annotations

import argparse
import textwrap
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from .common import DEFAULT_LOCAL, env, env_flag

__all__ = ["build_parser", "Flags", "sources", "LOG_LEVELS", "DEFAULT_BIND", "non_negative", "positive_int"]

DEFAULT_BIND = "0.0.0.0:7835"
LOG_LEVELS = ("debug", "info", "warning", "error")

SERVER_EXAMPLE = """example:
  FERROTUNNEL_TOKEN_FILE=token.txt ferrotunnel server --bind 0.0.0.0:7835 \\
      --http-bind 0.0.0.0:8080 --domain tunnel.example.com"""
CLIENT_EXAMPLE = """example:
  FERROTUNNEL_TOKEN_FILE=token.txt ferrotunnel client --server tunnel.example.com:7835 \\
      --tunnel-id web --local-addr 127.0.0.1:3000
  ferrotunnel client --config tunnels.toml      # many tunnels from one file"""
DEMO_EXAMPLE = "example:\n  ferrotunnel demo --requests 1000 --concurrency 16"


def non_negative(text: str) -> float:
    """An argparse type: a number of seconds >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return value


class _Repeat(argparse.Action):
    """A repeatable flag whose values replace its environment variable's list (never add to it)."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Optional[str] = None) -> None:
        given = namespace.__dict__.setdefault("repeated_flags", set())
        current = list(getattr(namespace, self.dest) or []) if self.dest in given else []
        given.add(self.dest)
        setattr(namespace, self.dest, current + [values])


class Flags:
    """Adds a subcommand's flags. ``env``: the variables, first one wins; ``show``: the default as
    help shows it (never read from the environment, so --help repeats no secret)."""

    def __init__(self, parser: Any) -> None:
        self.parser = parser
        #: dest -> (flag names, environment variables)
        self.table: Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...]]] = parser.get_default("flag_table") or {}
        parser.set_defaults(flag_table=self.table)

    def add(self, *names: str, help: str, env_names: Sequence[str] = (), default: Any = None,
            show: Optional[str] = None, kind: str = "value", group: Any = None, **kw: Any) -> None:
        envs = tuple(env_names)
        if kind == "flag":
            value: Any = any(env_flag(e) for e in envs) or bool(default)
            kw["action"] = "store_true"
        elif kind == "list":
            value = next(([x.strip() for x in (env(e) or "").split(",") if x.strip()] for e in envs if env(e)), [])
            kw["action"] = _Repeat
        else:
            value = next((env(e) for e in envs if env(e)), default)
        said = []
        if envs:
            said.append("env " + " or ".join(envs) + (", comma-separated" if kind == "list" else ""))
        if show is None:
            show = "off" if kind == "flag" else ("none" if default is None else str(default))
        said.append(f"default: {show}")
        full = f"{help} [{'; '.join(said)}]".replace("%", "%%")
        action = (group or self.parser).add_argument(*names, default=value, help=full, **kw)
        self.table[action.dest] = (tuple(n for n in names if n.startswith("--")), envs)


def sources(args: argparse.Namespace, argv: Sequence[str]) -> Dict[str, str]:
    """dest -> the flag or environment variable that supplied its value (for values that are set)."""
    out: Dict[str, str] = {}
    for dest, (flags, envs) in getattr(args, "flag_table", {}).items():
        if any(a == f or a.startswith(f + "=") for f in flags for a in argv):
            out[dest] = flags[0]
        else:
            named = next((e for e in envs if env(e)), None)
            if named is not None:
                out[dest] = named
    return out


def _token_flags(f: Flags) -> None:
    f.add("--token-file", metavar="PATH", show="none (env FERROTUNNEL_TOKEN_FILE is read at start, see below)",
          help="read the tunnel token from the first line of PATH")
    f.add("--token", env_names=(), show="none (env FERROTUNNEL_TOKEN is read at start, see below)",
          help="the tunnel token; visible in the process list until start-up moves it out: prefer --token-file or "
               "FERROTUNNEL_TOKEN (precedence below)")


def _common(f: Flags) -> None:
    f.add("--log-level", choices=LOG_LEVELS, env_names=("FERROTUNNEL_LOG_LEVEL",), default="info",
          help="how much to log on stderr: " + ", ".join(LOG_LEVELS))


def _server(sub: Any, token_help: str, cluster_help: str, add_cluster_args: Callable[[Any], None]) -> None:
    s = sub.add_parser("server", help="run the tunnel server and its public ingresses",
                       description="Accept tunnel clients on --bind and let visitors reach them through the "
                                   "ingresses (--http-bind, --https-bind, --tcp-bind, --tcp-port-range).",
                       epilog=SERVER_EXAMPLE + "\n\n" + textwrap.fill(token_help, 100) + "\n\n" + cluster_help,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    f = Flags(s)
    e = lambda *names: tuple(f"FERROTUNNEL_{n}" for n in names)  # noqa: E731
    f.add("--bind", metavar="HOST:PORT", env_names=e("BIND"), default=DEFAULT_BIND,
          help="where tunnel clients connect")
    _token_flags(f)
    f.add("--http-bind", metavar="HOST:PORT", env_names=e("HTTP_BIND"), show="off",
          help="HTTP ingress, routed by Host")
    f.add("--domain", env_names=e("DOMAIN"), help="visitors reach tunnel ID as ID.DOMAIN at the HTTP/HTTPS ingress (a "
          "bare Host: ID still works); tunnel ids must then be DNS labels")
    f.add("--public-host", metavar="HOST", env_names=e("PUBLIC_HOST"), show="the domain, else the ingress's bind host",
          help="host name the URLs told to clients show (behind a balancer)")
    f.add("--public-http-port", metavar="PORT", env_names=e("PUBLIC_HTTP_PORT"), show="the HTTP ingress's bound port",
          help="port the http:// URLs show")
    f.add("--https-bind", metavar="HOST:PORT", env_names=e("HTTPS_BIND"), show="off",
          help="HTTPS ingress (TLS for visitors), routed by SNI then Host")
    f.add("--https-cert", metavar="PEM", env_names=e("HTTPS_CERT"),
          help="the HTTPS ingress's certificate (a wildcard for the domain, e.g. from ferrotunnel certs --domain)")
    f.add("--https-key", metavar="PEM", env_names=e("HTTPS_KEY"), help="the HTTPS ingress's private key")
    f.add("--public-https-port", metavar="PORT", env_names=e("PUBLIC_HTTPS_PORT"), show="the bound one",
          help="the port https:// URLs show")
    f.add("--tcp-bind", metavar="ADDR[=TUNNEL_ID]", env_names=e("TCP_BIND"), kind="list", show="none",
          help="a TCP ingress (repeatable); without =TUNNEL_ID the first client that offers tcp gets it")
    f.add("--tcp-port-range", metavar="LO-HI", env_names=e("TCP_PORT_RANGE"), show="off",
          help="ports clients may ask for (client --remote-port), each a TCP ingress of its own while the client "
               "is connected")
    f.add("--tcp-port-host", metavar="HOST", env_names=e("TCP_PORT_HOST"), show="the host of --bind",
          help="where those ports are bound")
    f.add("--tls-cert", metavar="PEM", env_names=e("SERVER_TLS_CERT", "TLS_CERT"),
          help="the tunnel port's certificate: TLS for tunnel clients (with --tls-key)")
    f.add("--tls-key", metavar="PEM", env_names=e("SERVER_TLS_KEY", "TLS_KEY"), help="its private key")
    f.add("--tls-ca", metavar="PEM", env_names=e("SERVER_TLS_CA", "TLS_CA"),
          help="require client certificates signed by this CA (mutual TLS)")
    f.add("--tls-client-auth", kind="flag", env_names=e("SERVER_TLS_CLIENT_AUTH", "TLS_CLIENT_AUTH"),
          help="require client certificates (needs --tls-ca; a CA alone already requires them)")
    f.add("--metrics", kind="flag", env_names=e("METRICS"),
          help="serve Prometheus metrics on --metrics-bind (needs ferrotunnel[metrics])")
    f.add("--metrics-bind", metavar="HOST:PORT", env_names=e("METRICS_BIND"), default="127.0.0.1:9090",
          help="where the metrics are served")
    f.add("--client-tokens", metavar="FILE.toml", env_names=e("CLIENT_TOKENS"),
          help="per-client tokens, each with the tunnel ids it may claim ([[token]] token or sha256, tunnels = "
               "globs); re-read on SIGHUP; the shared token becomes optional")
    f.add("--grace", type=non_negative, metavar="SECONDS", env_names=e("GRACE"), default=10.0, show="10",
          help="how long open streams may finish after SIGTERM or Ctrl-C (a second Ctrl-C exits at once)")
    f.add("--limit", metavar="NAME=VALUE", env_names=e("LIMITS"), kind="list", show="the README's table",
          help="set one of the server's limits (any numeric ServerConfig field in the README's table of limits, "
               "e.g. max_sessions=5000, server_recv_limit=2GiB, max_ports_per_address=8); repeat for more")
    f.add("--trusted-proxy", metavar="CIDR", env_names=e("TRUSTED_PROXY"), kind="list", show="none",
          help="a balancer whose PROXY protocol v2 header names the real client (repeatable); a header from any "
               "other address is refused")
    _common(f)
    add_cluster_args(s)


def _client(sub: Any, token_help: str) -> None:
    c = sub.add_parser("client", help="connect to a server and forward its streams to a local service",
                       description="Connect to a tunnel server and forward each visitor's stream to a local service.",
                       epilog=CLIENT_EXAMPLE + "\n\n" + textwrap.fill(token_help, 100),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    f = Flags(c)
    e = lambda *names: tuple(f"FERROTUNNEL_{n}" for n in names)  # noqa: E731
    f.add("--server", metavar="HOST:PORT", env_names=e("SERVER"), help="the tunnel server (no scheme)")
    _token_flags(f)
    f.add("--config", metavar="FILE.toml", env_names=e("CONFIG"),
          help="serve every [[tunnel]] of a TOML file (server, token_file or token, [tls], [[tunnel]] id, local, "
               "protocol, remote_port, proxy_protocol, basic_auth, allow, pool); flags and environment win")
    f.add("--local-addr", metavar="HOST:PORT", env_names=e("LOCAL_ADDR"), show=DEFAULT_LOCAL,
          help="the local service")
    f.add("--tunnel-id", metavar="ID", env_names=e("TUNNEL_ID"), show="one the server picks",
          help="the name to route by (HTTP Host, or =TUNNEL_ID on a TCP ingress)")
    f.add("--proxy-protocol", choices=("v1", "v2"), env_names=e("PROXY_PROTOCOL"),
          help="send the local service a PROXY protocol header (v1 text, v2 binary) naming each visitor")
    f.add("--remote-port", metavar="N", env_names=e("REMOTE_PORT"),
          help="ask the server for public TCP port N of its --tcp-port-range (0: any free one) while connected")
    f.add("--protocol", choices=("http", "tcp"), env_names=e("PROTOCOL"), show="both",
          help="serve the tunnel only at the server's HTTP/HTTPS ingresses (http) or only at TCP ones (tcp)")
    f.add("--basic-auth", metavar="USER:PASSWORD", env_names=e("BASIC_AUTH"),
          help="HTTP visitors must send these credentials (401 until they do); prefer the environment variable: "
               "other users can read a command line")
    f.add("--allow", metavar="CIDR", env_names=e("ALLOW"), kind="list", show="any address",
          help="only visitors from this network reach the tunnel (repeatable)")
    f.add("--pool", kind="flag", env_names=e("POOL"),
          help="serve the tunnel id together with other clients that pass --pool (visitors are spread over them)")
    f.add("--max-retries", type=positive_int, metavar="N", env_names=e("MAX_RETRIES"), show="unlimited",
          help="give up (exit 1) after N failed connection attempts in a row")
    f.add("--max-connects-in-flight", type=positive_int, metavar="N", env_names=e("MAX_CONNECTS_IN_FLIGHT"),
          default=256, show="256", help="connects to the local service at once; more streams wait their turn")
    f.add("--grace", type=non_negative, metavar="SECONDS", env_names=e("GRACE"), default=10.0, show="10",
          help="how long open streams may finish after SIGTERM or Ctrl-C (a second Ctrl-C exits at once)")
    f.add("--tls", kind="flag", env_names=e("CLIENT_TLS", "TLS"),
          help="connect with TLS (implied by any other --tls-* flag); the server is verified against the system "
               "trust store unless --tls-ca")
    f.add("--tls-ca", metavar="PEM", env_names=e("CLIENT_TLS_CA", "TLS_CA"),
          help="verify the server against this CA instead of the system trust store")
    f.add("--tls-server-name", metavar="NAME", env_names=e("CLIENT_TLS_SERVER_NAME", "TLS_SERVER_NAME"),
          show="the --server host", help="the name the server's certificate must carry")
    f.add("--tls-skip-verify", kind="flag", env_names=e("CLIENT_TLS_SKIP_VERIFY", "TLS_SKIP_VERIFY"),
          help="accept any server certificate (unsafe: anyone on the path can read and change the traffic)")
    f.add("--tls-cert", metavar="PEM", env_names=e("CLIENT_TLS_CERT", "TLS_CERT"),
          help="a client certificate for a server that requires one (with --tls-key)")
    f.add("--tls-key", metavar="PEM", env_names=e("CLIENT_TLS_KEY", "TLS_KEY"), help="its private key")
    f.add("--inspect", metavar="HOST:PORT", env_names=e("INSPECT"), show="off",
          help="serve a live view of the HTTP requests through this client's tunnels at http://HOST:PORT/ "
               "(e.g. 127.0.0.1:4040; local and careful: see the README)")
    _common(f)


class _Version(argparse.Action):
    """``--version``: what the ``version`` command prints (the package is imported only then)."""

    def __init__(self, option_strings: Sequence[str], dest: str, show: Callable[[], int], **kw: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)
        self.show = show

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Optional[str] = None) -> None:
        parser.exit(self.show())


def build_parser(*, token_help: str, cluster_help: str, add_cluster_args: Callable[[Any], None],
                 add_certs_parser: Callable[[Any], None], version: Callable[[], int]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ferrotunnel", description="Expose a local TCP or HTTP service through a "
                                "FerroTunnel-compatible reverse tunnel.",
                                epilog="Run 'ferrotunnel COMMAND --help' for a command's flags, with their "
                                       "environment variables and defaults.")
    p.add_argument("--version", action=_Version, show=version, help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    _server(sub, token_help, cluster_help, add_cluster_args)
    _client(sub, token_help)
    add_certs_parser(sub)
    d = sub.add_parser("demo", help="server, client and a small HTTP app in one process, with traffic",
                       description="Run a server, a client and a small HTTP app in one process on loopback and "
                                   "send them traffic; prints what it measured.",
                       epilog=DEMO_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    f = Flags(d)
    f.add("--requests", type=positive_int, default=300, help="how many HTTP requests to send")
    f.add("--concurrency", type=positive_int, default=8, help="how many requests are in flight at once")
    f.add("--cluster", kind="flag", help="three cluster nodes, redis-server and haproxy (from PATH) on loopback, with "
          "traffic and a node failover (docs/cluster.md)")
    sub.add_parser("version", help="print the version", description="Print the version, the codec in use (compiled "
                   "or pure Python) and the platform.")
    return p
