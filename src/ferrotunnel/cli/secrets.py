"""The token of ``server`` and ``client``: where it comes from, and keeping it out of the process
list (a ``--token``, and a client's ``--basic-auth``, are moved to the environment by
re-executing the same PID)."""

from __future__ import annotations

import argparse
import errno
import getpass
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from .common import UsageError, env

__all__ = ["TOKEN_HELP", "read_token_file", "token_from_args", "without_token", "without_secret", "hide_token",
           "SECRET_FLAGS"]

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


def without_secret(argv: Sequence[str], flag: str) -> List[str]:
    """``argv`` without ``flag VALUE`` and ``flag=VALUE``: every occurrence, whatever its value
    (argparse took the last one; an earlier one left in place would win again after the
    re-execution, where a flag beats the environment), and ``flag`` also in any abbreviation
    argparse accepts, e.g. ``--basic``."""
    def is_flag(arg: str) -> bool:
        return len(arg) > 2 and arg.startswith("--") and flag.startswith(arg)

    out: List[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            out.extend(argv[i:])
            break
        if is_flag(arg) and i + 1 < len(argv):
            i += 2
            continue
        name, eq, _value = arg.partition("=")
        if eq and is_flag(name):
            i += 1
            continue
        out.append(arg)
        i += 1
    return out


#: Secret flags moved out of the process list besides --token: (flag, argparse dest, the
#: environment variable that carries the value across the re-execution).
SECRET_FLAGS = (("--basic-auth", "basic_auth", "FERROTUNNEL_BASIC_AUTH"),)


def hide_token(args: argparse.Namespace, argv: Sequence[str]) -> None:
    """Take a --token value (and a --basic-auth password, ``SECRET_FLAGS``) out of
    /proc/PID/cmdline: re-execute this process (same PID) without them, their values in
    FERROTUNNEL_TOKEN / FERROTUNNEL_BASIC_AUTH. Runs before any socket is opened. Returns only
    when there is nothing to do (or re-executing is impossible: then it warns that they stay
    visible)."""
    moved_here = os.environ.pop(_FROM_ARGV, None)
    if moved_here is not None:  # the re-executed process: never again
        moved = moved_here.split(",")
        if "FERROTUNNEL_TOKEN" in os.environ and ("token" in moved or moved_here == "1"):
            args.token = os.environ["FERROTUNNEL_TOKEN"]  # what --token said: it wins over the rest
        # (a moved SECRET_FLAGS value is its variable now, which the parser read like the flag)
        if "--token" in argv or any(a.startswith("--token=") for a in argv):
            print(f"ferrotunnel {args.command}: WARNING: --token is still in the process list; use --token-file "
                  f"or FERROTUNNEL_TOKEN", file=sys.stderr, flush=True)
        return
    rest: List[str] = list(argv)
    new_env: Dict[str, str] = {}
    if getattr(args, "token", None) is not None:
        if args.token_file is not None:
            raise UsageError("give either --token-file or --token, not both")
        rest, token = without_token(rest)
        if token is not None:
            new_env["FERROTUNNEL_TOKEN"] = token
    for flag, dest, var in SECRET_FLAGS:
        value = getattr(args, dest, None)
        if value is not None:
            kept = without_secret(rest, flag)
            if kept != rest:
                rest, new_env[var] = kept, value
    if not new_env:
        if getattr(args, "token", None) is not None:
            print(f"ferrotunnel {args.command}: WARNING: the token given with --token is visible to local users in "
                  f"the process list; use --token-file or FERROTUNNEL_TOKEN", file=sys.stderr, flush=True)
        return
    what = {"FERROTUNNEL_TOKEN": ("the token given with --token", "--token-file or FERROTUNNEL_TOKEN"),
            "FERROTUNNEL_BASIC_AUTH": ("the password given with --basic-auth",
                                       "FERROTUNNEL_BASIC_AUTH or basic_auth in a config file")}
    if os.name != "posix" or not sys.executable:
        for var in new_env:
            print(f"ferrotunnel {args.command}: WARNING: {what[var][0]} is visible to local users in the process "
                  f"list; use {what[var][1]}", file=sys.stderr, flush=True)
        return
    for var in new_env:
        print(f"ferrotunnel {args.command}: WARNING: {what[var][0]} was visible to local users in the process "
              f"list (/proc/{os.getpid()}/cmdline) until now and is removed from it at start-up; use "
              f"{what[var][1]} to keep it out entirely", file=sys.stderr, flush=True)
    import subprocess

    try:  # -X, -W, -O ... of this interpreter (the helper multiprocessing uses)
        flags: List[str] = list(getattr(subprocess, "_args_from_interpreter_flags")())
    except Exception:  # pragma: no cover - a private helper that went away
        flags = []
    moved_names = ",".join(["token"] * ("FERROTUNNEL_TOKEN" in new_env) +
                           [dest for _f, dest, var in SECRET_FLAGS if var in new_env])
    env = {**os.environ, **new_env, _FROM_ARGV: moved_names}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *flags, "-m", "ferrotunnel", *rest], env)
