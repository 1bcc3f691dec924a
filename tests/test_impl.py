"""Which implementation is active, and the guard CI relies on."""

import importlib
import os
import subprocess
import sys

import ferrotunnel.frames
import ferrotunnel.pool
import ferrotunnel.scheduler


def test_implementation_flag_is_consistent():
    impls = {ferrotunnel.frames.IMPLEMENTATION, ferrotunnel.pool.IMPLEMENTATION, ferrotunnel.scheduler.IMPLEMENTATION}
    assert impls in ({"c"}, {"py"})


def _flag(name):
    # the documented rule: any value except empty, 0, false or no sets a flag
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _compiled_built():
    try:
        for name in ("_frames", "_pool", "_sched"):
            importlib.import_module(f"ferrotunnel.{name}")
    except ImportError:
        return False
    return True


def test_active_implementation_is_the_one_asked_for():
    """Whatever the environment, the facades use what it asks for: the twins under
    FERROTUNNEL_NO_EXTENSIONS, otherwise the compiled modules whenever they are built (and
    FERROTUNNEL_REQUIRE_EXTENSIONS, as CI sets it, means they must be)."""
    twins = [importlib.import_module(f"ferrotunnel.{n}_py") for n in ("_frames", "_pool", "_sched")]
    if _flag("FERROTUNNEL_NO_EXTENSIONS"):
        want, mods = "py", twins
    elif _compiled_built():
        want, mods = "c", [importlib.import_module(f"ferrotunnel.{n}") for n in ("_frames", "_pool", "_sched")]
    else:
        assert not _flag("FERROTUNNEL_REQUIRE_EXTENSIONS"), "required extensions are not built, yet the import succeeded"
        want, mods = "py", twins
    frames_mod, pool_mod, sched_mod = mods
    assert (ferrotunnel.frames.IMPLEMENTATION, ferrotunnel.pool.IMPLEMENTATION,
            ferrotunnel.scheduler.IMPLEMENTATION) == (want, want, want)
    # not only the label: the facades hand out that module's objects
    assert ferrotunnel.frames.FrameDecoder is frames_mod.FrameDecoder
    assert ferrotunnel.frames.encode is frames_mod.encode
    assert ferrotunnel.pool.acquire_bytes is pool_mod.acquire_bytes
    assert ferrotunnel.scheduler.PriorityScheduler is sched_mod.PriorityScheduler
    if _flag("FERROTUNNEL_REQUIRE_EXTENSIONS") and not _flag("FERROTUNNEL_NO_EXTENSIONS"):
        assert want == "c"


# A child interpreter in which the compiled modules cannot be imported (as if never built).
_UNBUILT = """
import sys, warnings
class Block:
    def find_spec(self, name, path=None, target=None):
        if name in ("ferrotunnel._frames", "ferrotunnel._pool", "ferrotunnel._sched"):
            raise ImportError("blocked: " + name)
        return None
sys.meta_path.insert(0, Block())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
        import ferrotunnel.frames as f, ferrotunnel.pool as p, ferrotunnel.scheduler as s
    except ImportError as exc:
        print("ImportError", "FERROTUNNEL_REQUIRE_EXTENSIONS" in str(exc))
    else:
        print(f.IMPLEMENTATION, p.IMPLEMENTATION, s.IMPLEMENTATION,
              sum(issubclass(w.category, RuntimeWarning) for w in caught))
"""


def _unbuilt(**env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FERROTUNNEL_")}
    out = subprocess.run([sys.executable, "-c", _UNBUILT], env=dict(clean, **env), capture_output=True, text=True,
                         check=True)
    return out.stdout.split()


def test_missing_extensions_fall_back_with_one_warning():
    assert _unbuilt() == ["py", "py", "py", "1"]


def test_required_extensions_missing_is_an_import_error():
    # the guard CI relies on: a build without the compiled modules cannot pass as the compiled pass
    assert _unbuilt(FERROTUNNEL_REQUIRE_EXTENSIONS="1") == ["ImportError", "True"]
    assert _unbuilt(FERROTUNNEL_REQUIRE_EXTENSIONS="0") == ["py", "py", "py", "1"]  # "0" is not set


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
