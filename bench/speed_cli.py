"""The ``ferrotunnel`` command as bench/speed.py runs it: exactly ``python -m ferrotunnel ARGS``,
plus two things the benchmark needs and the command does not offer.

* ``FT_SPEED_SERVER_CONFIG`` (JSON object): ServerConfig fields the benchmark raises in its own
  configuration (row 8 of issue 14 holds 9,990 idle visitor connections from one address and 999
  extra sessions, beyond ``ingress_max_per_address`` and ``max_sessions``). Applied on top of the
  CLI server's own configuration (``commands.server_config``); nothing else changes.
* ``FT_SPEED_PROFILE=PATH``: SIGUSR1 starts cProfile, SIGUSR2 stops it and writes the top
  functions by cumulative and by self time to PATH (then renames PATH.tmp to PATH, so a reader
  that sees PATH sees all of it). ``FT_SPEED_PROFILE_TOP`` sets how many (default 25).

    python bench/speed_cli.py server --bind ... --tcp-bind ...
"""

from __future__ import annotations

import cProfile
import dataclasses
import io
import json
import os
import pstats
import signal
import sys


def _with_overrides(commands) -> None:
    overrides = json.loads(os.environ.get("FT_SPEED_SERVER_CONFIG", "{}"))
    if not overrides:
        return
    plain = commands.server_config

    def server_config(*args, **kwargs):
        return dataclasses.replace(plain(*args, **kwargs), **overrides)

    commands.server_config = server_config


def _profiled(path: str) -> None:
    top = int(os.environ.get("FT_SPEED_PROFILE_TOP", "25"))
    state = {"prof": None}

    def start(signum, frame):
        if state["prof"] is None:
            state["prof"] = cProfile.Profile()
            state["prof"].enable()

    def stop(signum, frame):
        prof, state["prof"] = state["prof"], None
        if prof is None:
            return
        prof.disable()
        out = io.StringIO()
        for key, title in (("cumulative", "by cumulative time"), ("tottime", "by self time")):
            out.write(f"--- {title} (top {top})\n")
            stats = pstats.Stats(prof, stream=out)
            stats.sort_stats(key).print_stats(top)
        with open(path + ".tmp", "w") as f:
            f.write(out.getvalue())
        os.replace(path + ".tmp", path)

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)


def main() -> int:
    from ferrotunnel.cli import commands

    _with_overrides(commands)
    if os.environ.get("FT_SPEED_PROFILE"):
        _profiled(os.environ["FT_SPEED_PROFILE"])
    sys.argv[0] = "ferrotunnel"
    return commands.main()


if __name__ == "__main__":
    sys.exit(main())
