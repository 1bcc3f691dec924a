"""``ferrotunnel certs``: a CA and certificate pairs for trying TLS out.

A CA already in the directory (``ca.pem`` and ``ca.key``) signs the new pairs, so a server that
runs with the old ones keeps working: with a CA there, ``--client`` writes only the client pair,
``--domain`` only the wildcard pair, and neither the server pair. Without one, a new CA and the
server pair are written, plus what was asked for. No file is ever overwritten without ``--force``
(and even then the CA stays: remove ``ca.pem``/``ca.key`` to make a new one).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from .common import UsageError

__all__ = ["add_certs_parser", "run_certs"]


def add_certs_parser(sub: Any) -> None:
    k = sub.add_parser("certs", help="make a CA and a server certificate (and a client or wildcard pair) for TLS",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    k.add_argument("--out", required=True, help="directory for ca.pem, ca.key, server.pem, server.key (and the "
                   "client.* or wildcard.* pair)")
    k.add_argument("--name", action="append", help="DNS name on the server certificate (repeatable; default localhost)")
    k.add_argument("--ip", action="append", help="IP address on the server certificate (repeatable; default 127.0.0.1)")
    k.add_argument("--client", action="store_true", help="write client.pem and client.key for mutual TLS")
    k.add_argument("--domain", help="write wildcard.pem and wildcard.key for *.DOMAIN and DOMAIN (the HTTPS ingress)")
    k.add_argument("--days", type=int, default=825, help="validity of the leaf certificates (default 825)")
    k.add_argument("--force", action="store_true", help="overwrite existing certificate files (the CA is kept)")


def run_certs(args: argparse.Namespace) -> int:
    from ..client.diagnose import describe_error
    from ..tls import CertificatesExist, generate_certs

    if args.days < 1:
        raise UsageError(f"--days must be at least 1, got {args.days}")
    out = args.out
    has_ca = os.path.isfile(os.path.join(out, "ca.pem")) and os.path.isfile(os.path.join(out, "ca.key"))
    asked = {"client"} if args.client else set()
    if args.domain:
        asked.add("wildcard")
    pairs = (asked or {"server"}) if has_ca else {"server"} | asked
    names = args.name or ["localhost"]
    ips = args.ip or ["127.0.0.1"]
    try:
        paths = generate_certs(out, names=names, ips=ips, days=args.days, domain=args.domain, pairs=pairs,
                               reuse_ca=True, force=args.force)
    except CertificatesExist as exc:
        print(f"ferrotunnel certs: would overwrite {', '.join(str(p) for p in exc.paths)}; pass --force to replace "
              f"them (a server using them needs the new ones)", file=sys.stderr)
        return 1
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        print(f"ferrotunnel: cannot write certificates to {out}: {describe_error(exc)}", file=sys.stderr)
        return 1
    for name, path in sorted(paths.items()):
        print(f"wrote {path}")
    print(f"signed by {'the CA already in ' + out if has_ca else 'a new CA'}; keys are readable by you only")
    if "server" in pairs:
        print(f"server certificate valid for {', '.join(names + ips)}")
    if "wildcard" in pairs:
        d = args.domain.strip().lower().rstrip(".")
        print(f"wildcard certificate valid for *.{d} and {d}")
    return 0
