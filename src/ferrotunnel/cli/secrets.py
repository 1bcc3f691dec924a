"""The token of ``server`` and ``client``: where it comes from, and keeping it out of the process
list (a ``--token`` is moved to the environment by re-executing the same PID)."""

from __future__ import annotations

import argparse
import errno
import getpass
import os
import sys
from typing import List, Optional, Sequence, Tuple

from .common import UsageError, env

__all__ = ["TOKEN_HELP", "read_token_file", "token_from_args", "without_token", "hide_token"]

TOKEN_HELP = ("Where the token comes from, first found wins: --token-file PATH or --token (not both), then "
              "FERROTUNNEL_TOKEN, then the file named by FERROTUNNEL_TOKEN_FILE, then a prompt without echo "
              "when standard input is a terminal. A token file holds the token on its first line (surrounding "
              "whitespace is ignored). --token is visible to every local user in the process list: at start-up "
              "ferrotunnel moves it into its environment (re-executing itself, same PID) and warns; prefer "
              "--token-file or FERROTUNNEL_TOKEN.")

#: Set in the environment of the re-executed process: FERROTUNNEL_TOKEN holds what --token said.
#: Also the guard against re-executing twice.
_FROM_ARGV = "_FERROTUNNEL_TOKEN_FROM_ARGV"
_MAX_TOKEN_FILE = 64 * 1024


def read_token_file(path: str, source: str) -> str:
    """The first line of ``path``, stripped. Errors name the path, never the content."""
    where = f"{source} {path}"
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_TOKEN_FILE)
    except OSError as exc:
        why = {errno.ENOENT: "no such file", errno.EISDIR: "is a directory, not a token file",
               errno.EACCES: "permission denied; it must be readable by the user running ferrotunnel"}
        raise UsageError(f"{where}: {why.get(exc.errno or 0, f'cannot read it ({exc.strerror})')}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{where}: not UTF-8 text; put the token on the file's first line") from None
    token = text.split("\n", 1)[0].strip()
    if not token:
        raise UsageError(f"{where}: the first line is empty; put the token on the file's first line")
    return token


def token_from_args(args: argparse.Namespace) -> str:
    """The token, by the precedence in TOKEN_HELP. Nothing here prints or logs it."""
    from ..auth import TokenFormatError, validate_token_format

    if args.token is not None and args.token_file is not None:
        raise UsageError("give either --token-file or --token, not both")
    if args.token_file is not None:
        token, source = read_token_file(args.token_file, "--token-file"), f"--token-file {args.token_file}"
    elif args.token is not None:
        token, source = args.token, "--token"
    elif env("FERROTUNNEL_TOKEN"):
        token, source = os.environ["FERROTUNNEL_TOKEN"], "FERROTUNNEL_TOKEN"
    elif env("FERROTUNNEL_TOKEN_FILE"):
        path = os.environ["FERROTUNNEL_TOKEN_FILE"]
        token, source = read_token_file(path, "FERROTUNNEL_TOKEN_FILE"), f"FERROTUNNEL_TOKEN_FILE {path}"
    elif sys.stdin is not None and sys.stdin.isatty():
        token, source = getpass.getpass("Tunnel token: "), "the prompt"  # no echo
    else:
        raise UsageError("no token: pass --token-file PATH, set FERROTUNNEL_TOKEN or FERROTUNNEL_TOKEN_FILE, or "
                         "run in a terminal to be prompted")
    try:
        validate_token_format(token)
    except TokenFormatError as exc:
        raise UsageError(f"invalid token (from {source}): {exc}") from None
    return token


def without_token(argv: Sequence[str]) -> Tuple[List[str], Optional[str]]:
    """``argv`` without ``--token VALUE`` and ``--token=VALUE`` (every occurrence), and the value
    argparse took (the last one). ``--token`` is never an abbreviation: ``--token-file`` shares
    its prefix, so argparse accepts only the full flag for it."""
    out: List[str] = []
    token: Optional[str] = None
    it = iter(argv)
    for arg in it:
        if arg == "--":
            out.append(arg)
            out.extend(it)
            break
        if arg == "--token":
            token = next(it, None)
            continue
        if arg.startswith("--token="):
            token = arg[len("--token="):]
            continue
        out.append(arg)
    return out, token


def hide_token(args: argparse.Namespace, argv: Sequence[str]) -> None:
    """Take a --token value out of /proc/PID/cmdline: re-execute this process (same PID) without
    it, the token in FERROTUNNEL_TOKEN. Runs before any socket is opened. Returns only when there
    is nothing to do (or re-executing is impossible: then it warns that the token stays visible)."""
    if os.environ.pop(_FROM_ARGV, None) is not None:  # the re-executed process: never again
        if "FERROTUNNEL_TOKEN" in os.environ:
            args.token = os.environ["FERROTUNNEL_TOKEN"]  # what --token said: it wins over the rest
        if "--token" in argv or any(a.startswith("--token=") for a in argv):
            print(f"ferrotunnel {args.command}: WARNING: --token is still in the process list; use --token-file "
                  f"or FERROTUNNEL_TOKEN", file=sys.stderr, flush=True)
        return
    if getattr(args, "token", None) is None:
        return
    if args.token_file is not None:
        raise UsageError("give either --token-file or --token, not both")
    rest, token = without_token(argv)
    if token is None or os.name != "posix" or not sys.executable:
        print(f"ferrotunnel {args.command}: WARNING: the token given with --token is visible to local users in "
              f"the process list; use --token-file or FERROTUNNEL_TOKEN", file=sys.stderr, flush=True)
        return
    print(f"ferrotunnel {args.command}: WARNING: the token given with --token was visible to local users in the "
          f"process list (/proc/{os.getpid()}/cmdline) until now and is removed from it at start-up; use "
          f"--token-file or FERROTUNNEL_TOKEN to keep it out entirely", file=sys.stderr, flush=True)
    import subprocess

    try:  # -X, -W, -O ... of this interpreter (the helper multiprocessing uses)
        flags: List[str] = list(getattr(subprocess, "_args_from_interpreter_flags")())
    except Exception:  # pragma: no cover - a private helper that went away
        flags = []
    env = {**os.environ, "FERROTUNNEL_TOKEN": token, _FROM_ARGV: "1"}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *flags, "-m", "ferrotunnel", *rest], env)
