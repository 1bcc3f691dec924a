"""Where visitors reach a tunnel: the server's public endpoints and the URLs they give each
client (sent to ferrotunnel clients by the public-URLs extension), and the rules for ids that
must be DNS labels once a domain is in use."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Tuple

__all__ = ["PublicEndpoint", "public_urls", "is_dns_label", "normalize_domain", "DNS_LABEL_RULE"]

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
DNS_LABEL_RULE = "1..63 characters of a-z, 0-9 and '-', not starting or ending with '-'"
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class PublicEndpoint:
    """One public entry point as visitors see it (behind a balancer: the balancer's address).

    ``scheme`` is ``"http"`` or ``"https"`` (routed by Host: ``ID.DOMAIN``, or ``ID`` itself without a domain) or
    ``"tcp"``; a tcp endpoint with a ``tunnel_id`` serves only that tunnel, one without serves
    any client that announced ``tcp``."""

    scheme: str
    host: str
    port: int
    tunnel_id: Optional[str] = None

    def __post_init__(self) -> None:
        if self.scheme not in ("http", "https", "tcp"):
            raise ValueError(f"a public endpoint's scheme is http, https or tcp, not {self.scheme!r}")
        if not self.host or not 0 < self.port < 65536:
            raise ValueError(f"a public endpoint needs a host and a port in 1..65535, got {self.host!r}:{self.port}")


def _authority(host: str, port: int, scheme: str) -> str:
    host = f"[{host}]" if ":" in host else host
    return host if _DEFAULT_PORTS.get(scheme) == port else f"{host}:{port}"


def public_urls(endpoints: Iterable[PublicEndpoint], tunnel_id: str, capabilities: Sequence[str],
                domain: Optional[str] = None) -> Tuple[str, ...]:
    """The URLs under which visitors reach ``tunnel_id`` (claimed, so lower case) of a client that
    announced ``capabilities``: an http endpoint gives ``http://ID.DOMAIN[:PORT]`` with a domain
    (the port left out when it is 80), else ``http://HOST[:PORT]`` (visitors send ``Host: ID``);
    a tcp endpoint gives ``tcp://HOST:PORT`` when it routes to this id, or to any ``tcp`` client
    and this one announced ``tcp``."""
    urls = []
    for ep in endpoints:
        if ep.scheme in ("http", "https"):
            host = f"{tunnel_id}.{domain}" if domain else ep.host
            urls.append(f"{ep.scheme}://{_authority(host, ep.port, ep.scheme)}")
        elif (ep.tunnel_id.lower() == tunnel_id) if ep.tunnel_id else ("tcp" in capabilities):
            urls.append(f"tcp://{_authority(ep.host, ep.port, 'tcp')}")
    return tuple(dict.fromkeys(urls))


def is_dns_label(name: str) -> bool:
    """Whether ``name`` (in lower case) can be the first label of ``ID.DOMAIN``: ``DNS_LABEL_RULE``."""
    return _LABEL.fullmatch(name) is not None


def normalize_domain(domain: str) -> str:
    """``domain`` in lower case without a trailing dot; ValueError unless it is a DNS name of
    labels as ``dns_label_problem`` wants them, at most 253 characters."""
    name = domain.strip().lower().rstrip(".")
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_LABEL.fullmatch(x) for x in labels):
        raise ValueError(f"domain must be a DNS name such as tunnel.example.com (labels of {DNS_LABEL_RULE}), "
                         f"got {domain!r}")
    return name
