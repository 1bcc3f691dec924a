"""The server and client commands tune glibc malloc (cli/malloc.py): buffers of up to 1 MiB come
from the heap instead of fresh mappings; FERROTUNNEL_MALLOC_TUNING=0 or a GLIBC_TUNABLES malloc
setting leaves the defaults. Checked in fresh interpreters: where does a 2 MiB buffer land?"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ferrotunnel.cli import commands
from ferrotunnel.cli.malloc import MALLOC_MMAP_THRESHOLD, MALLOC_TRIM_INTERVAL, MALLOC_TRIM_THRESHOLD, tune_malloc

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")

# Prints "heap" when a fresh 2 MiB bytearray lies below the program break (the heap), "mapped"
# when it lies above it (an mmap of its own), after calling tune_malloc() if asked.
PROBE = r"""
import ctypes, sys
from ferrotunnel.cli.malloc import tune_malloc
applied = tune_malloc() if sys.argv[1] == "tune" else None
libc = ctypes.CDLL("libc.so.6")
libc.sbrk.restype = ctypes.c_void_p
libc.sbrk.argtypes = (ctypes.c_long,)
buf = bytearray(2 * 1024 * 1024)
addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
print(applied, "heap" if addr < libc.sbrk(0) else "mapped")
"""


def probe(mode: str, **env: str) -> str:
    e = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "FERROTUNNEL_MALLOC_TUNING")}
    e.update(env)
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env=e, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_tuned_buffers_come_from_the_heap():
    assert probe("plain") == "None mapped"  # glibc's default: a 2 MiB block is a mapping of its own
    assert probe("tune") == "True heap"


@pytest.mark.parametrize("env", [{"FERROTUNNEL_MALLOC_TUNING": "0"}, {"FERROTUNNEL_MALLOC_TUNING": "off"}, {"MALLOC_TRIM_THRESHOLD_": "1"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}])
def test_it_can_be_turned_off(env):
    assert probe("tune", **env) == "False mapped"
    assert tune_malloc(env) is False


def test_named_and_documented():
    assert (MALLOC_MMAP_THRESHOLD, MALLOC_TRIM_THRESHOLD, MALLOC_TRIM_INTERVAL) == (4 << 20, 64 << 20, 10.0)
    with open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert "`FERROTUNNEL_MALLOC_TUNING`" in readme and "`MALLOC_TRIM_THRESHOLD`" in readme and "`MALLOC_TRIM_INTERVAL`" in readme


@pytest.mark.parametrize("command, called", [("server", True), ("client", True), ("version", False)])
def test_the_real_server_and_client_commands_tune(monkeypatch, command, called):
    calls = []
    monkeypatch.setattr(commands, "tune_malloc", lambda: calls.append(1))
    monkeypatch.setattr(commands, "_run", lambda coro: coro.close() or 0)
    monkeypatch.setattr(commands, "hide_token", lambda args, argv: None)
    argv = {"server": ["server", "--token", "x" * 16], "client": ["client", "--token", "x" * 16, "--tunnel-id", "t1"],
            "version": ["version"]}[command]
    monkeypatch.setattr(sys, "argv", ["ferrotunnel", *argv])
    commands.main()  # argv None: the real command
    assert bool(calls) is called
    calls.clear()
    commands.main(argv)  # an in-process caller: its process is its own
    assert not calls


# A burst of 1 MiB buffers with small long-lived objects between them, then the buffers go: the
# freed memory lies inside the heap, where only malloc_trim gives it back. Prints the RSS (MiB)
# while they were held and after waiting for the trimming thread (interval 0.2 s here).
BURST = r"""
import sys, time
import ferrotunnel.cli.malloc as m
m.MALLOC_TRIM_INTERVAL = 0.2
assert m.tune_malloc()
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
big, small = [], []
for _ in range(200):
    b = bytearray(1 << 20)
    b[::4096] = b"x" * len(b[::4096])  # touch every page
    big.append(b)
    small.append(bytearray(2000))
peak = rss()
del big
time.sleep(1.0)
print(round(peak), round(rss()))
"""


def test_the_trimming_thread_gives_a_bursts_memory_back():
    e = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "FERROTUNNEL_MALLOC_TUNING")}
    out = subprocess.run([sys.executable, "-c", BURST], env=e, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    peak, after = map(int, out.stdout.split())
    assert peak >= 200 and after < peak - 150, (peak, after)
