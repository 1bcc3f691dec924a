"""``ferrotunnel server``'s cluster flags, and the ``ClusterNode`` they describe."""

from __future__ import annotations

import argparse
import os
import socket
from typing import Any, Optional, Tuple

__all__ = ["add_cluster_args", "cluster_config", "CLUSTER_HELP"]

DEFAULT_NODE_PORT = 7836

CLUSTER_HELP = """cluster mode (several servers, one tunnel namespace; see docs/cluster.md):
  --cluster-redis URL turns it on (or FERROTUNNEL_CLUSTER_REDIS, or --cluster-redis-file PATH /
  FERROTUNNEL_CLUSTER_REDIS_FILE with the URL on its first line: a URL with a password belongs there,
  not on the command line). The cluster secret comes from FERROTUNNEL_CLUSTER_TOKEN or
  --cluster-token-file PATH (FERROTUNNEL_CLUSTER_TOKEN_FILE); without it a cluster node exits 2."""


def _env(name: str, default: Optional[str] = None) -> Optional[str]:
    value = os.environ.get(name)
    return value if value else default


def add_cluster_args(parser: argparse.ArgumentParser) -> None:
    from .parser import Flags

    g = parser.add_argument_group("cluster")
    f = Flags(parser)
    f.add("--cluster-redis", metavar="URL", env_names=("FERROTUNNEL_CLUSTER_REDIS",), show="off", group=g,
          help="redis://host:port/db or rediss://...: run as a cluster node")
    f.add("--cluster-redis-file", metavar="PATH", env_names=("FERROTUNNEL_CLUSTER_REDIS_FILE",), group=g,
          help="read the Redis URL from this file's first line (where a URL with a password belongs)")
    f.add("--cluster-token-file", metavar="PATH", env_names=("FERROTUNNEL_CLUSTER_TOKEN_FILE",), group=g,
          show="none (or env FERROTUNNEL_CLUSTER_TOKEN)", help="the cluster secret from this file's first line")
    f.add("--node-id", env_names=("FERROTUNNEL_NODE_ID",), show="host name and tunnel port", group=g,
          help="this node's name in the cluster")
    f.add("--node-bind", metavar="HOST:PORT", env_names=("FERROTUNNEL_NODE_BIND",), group=g,
          show=f"the --bind host, port {DEFAULT_NODE_PORT}", help="where node links are accepted")
    f.add("--node-advertise", metavar="HOST:PORT", env_names=("FERROTUNNEL_NODE_ADVERTISE",), group=g,
          show="--node-bind", help="where the other nodes reach this one")


class ClusterUsageError(ValueError):
    """A cluster flag that cannot work; the command exits 2 with this message."""


#: Most bytes read of a --cluster-redis-file or --cluster-token-file (a URL or a secret is a line).
MAX_SECRET_FILE = 64 * 1024


def _first_line(path: str, what: str) -> str:
    """The file's first line, stripped. Errors name the file, never its content."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SECRET_FILE)
    except OSError as exc:
        raise ClusterUsageError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        line = data.split(b"\n", 1)[0].decode("utf-8").strip()  # (the read may end inside a character)
    except UnicodeDecodeError:  # e.g. raw random bytes: a secret must be text
        raise ClusterUsageError(f"{what} {path} is not UTF-8 text: put the value on its first line as text "
                                "(for a secret, e.g. the output of 'openssl rand -hex 32')") from None
    if not line:
        raise ClusterUsageError(f"{what} {path} is empty")
    return line


def cluster_config(args: argparse.Namespace, bind: Tuple[str, int], parse_addr: Any) -> Optional[Tuple[Any, Tuple[str, int]]]:
    """(ClusterConfig, node bind) from the flags, or None when cluster mode is off."""
    from ..config import ClusterConfig

    url = args.cluster_redis
    if args.cluster_redis_file:
        if url and _env("FERROTUNNEL_CLUSTER_REDIS") != url:
            raise ClusterUsageError("give either --cluster-redis or --cluster-redis-file, not both")
        url = _first_line(args.cluster_redis_file, "--cluster-redis-file")
    if not url:
        if args.node_id or args.node_bind or args.node_advertise or args.cluster_token_file:
            raise ClusterUsageError("the --node-* and --cluster-token-file flags need --cluster-redis (cluster mode)")
        return None
    if args.cluster_redis and args.cluster_redis == url and _env("FERROTUNNEL_CLUSTER_REDIS") != url \
            and ("@" in url.split("://", 1)[-1].split("/", 1)[0] or "password=" in url.lower()):
        raise ClusterUsageError("a Redis password on the command line is visible to every local user (ps): put the "
                                "URL in FERROTUNNEL_CLUSTER_REDIS or in a file for --cluster-redis-file")
    if args.cluster_token_file:
        secret = _first_line(args.cluster_token_file, "--cluster-token-file")
    else:
        secret = _env("FERROTUNNEL_CLUSTER_TOKEN") or ""
    if not secret:
        raise ClusterUsageError("a cluster node needs the cluster secret: set FERROTUNNEL_CLUSTER_TOKEN or pass "
                                "--cluster-token-file PATH (the same secret on every node)")
    node_bind = parse_addr(args.node_bind, "--node-bind") if args.node_bind else (bind[0], DEFAULT_NODE_PORT)
    if args.node_advertise:
        advertise = parse_addr(args.node_advertise, "--node-advertise")
    elif node_bind[0] in ("", "0.0.0.0", "::"):
        raise ClusterUsageError(f"--node-bind {node_bind[0] or '*'}:{node_bind[1]} listens on every address: say "
                                "with --node-advertise HOST:PORT where the other nodes reach this one")
    else:
        advertise = node_bind
    node_id = args.node_id or f"{socket.gethostname()}:{bind[1]}"
    try:
        config = ClusterConfig(redis_url=url, node_id=node_id, node_advertise=advertise, cluster_token=secret)
    except ValueError as exc:
        raise ClusterUsageError(str(exc)) from None
    return config, node_bind
