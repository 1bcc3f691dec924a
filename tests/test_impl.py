"""Which implementation is active, and the guard CI relies on."""

import os
import subprocess
import sys

import ferrotunnel.frames
import ferrotunnel.pool
import ferrotunnel.scheduler


def test_implementation_flag_is_consistent():
    impls = {ferrotunnel.frames.IMPLEMENTATION, ferrotunnel.pool.IMPLEMENTATION, ferrotunnel.scheduler.IMPLEMENTATION}
    assert impls in ({"c"}, {"py"})


def test_required_build_is_really_compiled():
    # CI sets FERROTUNNEL_REQUIRE_EXTENSIONS for the compiled run: the twin must not sneak in.
    if os.environ.get("FERROTUNNEL_REQUIRE_EXTENSIONS") == "1" and os.environ.get("FERROTUNNEL_NO_EXTENSIONS") != "1":
        assert ferrotunnel.frames.IMPLEMENTATION == "c"


def test_no_extensions_selects_twin():
    env = dict(os.environ, FERROTUNNEL_NO_EXTENSIONS="1")
    out = subprocess.run(
        [sys.executable, "-c", "import ferrotunnel.frames as f, ferrotunnel.pool as p, ferrotunnel.scheduler as s;"
         "print(f.IMPLEMENTATION, p.IMPLEMENTATION, s.IMPLEMENTATION)"],
        env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["py", "py", "py"]


def test_top_level_exports_errors():
    import ferrotunnel as ft
    assert issubclass(ft.FrameError, ft.FerroTunnelError)
    assert ferrotunnel.frames.FrameError is ft.FrameError
