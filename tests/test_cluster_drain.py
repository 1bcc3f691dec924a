"""Graceful drain of a CLI cluster node behind a real HAProxy (deploy/haproxy.cfg on loopback
ports), one real redis-server: SIGTERM on the node that holds a tunnel closes its listeners at
once, its ferrotunnel client moves to another node through the balancer while a 200 MB download
in flight on the draining node completes byte-exact; visitors during the drain are all served,
by the new session once the claim moved and the routes followed; the node exits 0 once its
streams are done, long before its grace period ends."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import ferrotunnel as ft

from conftest import free_port
from haproxy_server import HAProxy
from redis_server import RedisServer, stop_by_pid
from test_drain import App, _ask, _download, _expected

TOKEN = "cluster-drain-token"
SECRET = "cluster-drain-secret"
SIZE = 200 * 1000 * 1000
#: Seconds after the claim moved within which a visitor may still reach the old session (a lookup
#: that was in flight when it moved); generous, to catch a route that never follows.
ROUTES_FOLLOW = 1.0


class NodeProc:
    """A CLI server node; its output goes to a file (a pipe nobody reads could fill and block it)."""

    def __init__(self, name: str, url_file: Path, log_dir: Path) -> None:
        self.name = name
        self.ports: Dict = {7835: free_port(), 8080: free_port(), 9000: free_port(), "link": free_port()}
        self.log = log_dir / f"{name}.log"
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("FERROTUNNEL_")},
               "FERROTUNNEL_TOKEN": TOKEN, "FERROTUNNEL_CLUSTER_TOKEN": SECRET}
        for k in ("FERROTUNNEL_NO_EXTENSIONS", "FERROTUNNEL_REQUIRE_EXTENSIONS"):
            if k in os.environ:
                env[k] = os.environ[k]
        p = self.ports
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ferrotunnel", "server", "--bind", f"127.0.0.1:{p[7835]}",
                 "--http-bind", f"127.0.0.1:{p[8080]}", "--tcp-bind", f"127.0.0.1:{p[9000]}=big",
                 "--trusted-proxy", "127.0.0.1/32", "--cluster-redis-file", str(url_file), "--node-id", name,
                 "--node-bind", f"127.0.0.1:{p['link']}", "--grace", "60", "--log-level", "info"],
                stdout=out, stderr=subprocess.STDOUT, env=env)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_listening(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while "ferrotunnel server listening on" not in self.text():  # the banner: every port is bound
            assert self.proc.poll() is None, self.text()[-3000:]
            assert time.monotonic() < deadline, self.text()[-3000:]
            time.sleep(0.05)


def _claim_holder(url: str) -> str:
    import redis

    r = redis.Redis.from_url(url)
    try:
        node = r.hget("ferrotunnel:tunnel:big", "node")
        return node.decode() if node else ""
    finally:
        r.close()


def test_drain_hands_the_client_over_and_the_200_mb_download_completes(run, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ferrotunnel")  # the client's side, shown if it fails
    with RedisServer() as redis:
        url_file = tmp_path / "redis-url"
        url_file.write_text(redis.url + "\n")
        nodes: List[NodeProc] = []
        try:
            for name in ("a", "b", "c"):
                nodes.append(NodeProc(name, url_file, tmp_path))
            for n in nodes:
                n.wait_listening()
            fronts = {7835: free_port(), 80: free_port(), 9000: free_port()}
            with HAProxy(fronts, [n.ports for n in nodes]) as haproxy:
                report: Dict = {}

                async def body():
                    app = App()
                    client = ft.TunnelClient(f"127.0.0.1:{fronts[7835]}", TOKEN, tunnel_id="big")
                    connected = asyncio.Event()
                    task = asyncio.create_task(client.connect_and_run(app, on_connected=lambda s: connected.set()))
                    try:
                        await asyncio.wait_for(connected.wait(), 20)
                        assert client.session is not None
                        old_id = client.session.id
                        holder = await asyncio.to_thread(_claim_holder, redis.url)
                        owner = next(n for n in nodes if n.name == holder)
                        started = asyncio.Event()
                        # from the owner's own TCP ingress, read slowly: still in flight at SIGTERM
                        down = asyncio.create_task(
                            _download(("127.0.0.1", owner.ports[9000]), SIZE, started, 0.002))
                        await asyncio.wait_for(started.wait(), 20)
                        t0 = time.monotonic()
                        owner.proc.send_signal(signal.SIGTERM)

                        # visitors through the balancer during the drain: every one is served;
                        # once the claim moved, by the new session
                        served_old = served_new = 0
                        moved_at = None
                        while not down.done():
                            if moved_at is None and (await asyncio.to_thread(_claim_holder, redis.url)) not in (
                                    "", owner.name):
                                moved_at = time.monotonic() - t0
                            who = await _ask(("127.0.0.1", fronts[9000]), b"WHO\n")
                            assert who, "a visitor during the drain got no answer"
                            if who == str(old_id).encode():
                                # once the claim moved, the other nodes' routes follow at once (the
                                # leaving node told them over the links), but a lookup already in
                                # flight may still name the old node: allow that for a moment only
                                late = 0.0 if moved_at is None else time.monotonic() - t0 - moved_at
                                assert late < ROUTES_FOLLOW, f"old session {late:.2f} s after the claim moved"
                                served_old += 1
                            else:
                                served_new += 1
                            await asyncio.sleep(0.1)
                        got, digest = await down
                        done_at = time.monotonic() - t0
                        assert got == SIZE and digest == _expected(SIZE), "the download was not byte-exact"
                        assert moved_at is not None and served_new >= 3, (moved_at, served_old, served_new)
                        assert client.session is not None and client.session.id != old_id
                        # the node exits once its streams are done (grace is 60 s)
                        code = await asyncio.to_thread(owner.proc.wait, 30)
                        exit_at = time.monotonic() - t0
                        assert code == 0, owner.text()[-3000:]
                        assert exit_at < 45, exit_at
                        report.update(moved=moved_at, done=done_at, exit=exit_at, old=served_old, new=served_new)
                    finally:
                        task.cancel()
                        await asyncio.gather(task, return_exceptions=True)

                try:
                    run(body, timeout=240)
                except BaseException:
                    for n in nodes:
                        print(f"---- node {n.name}\n{n.text()[-4000:]}")
                    print(f"---- haproxy\n{haproxy.log_text()[-6000:]}")
                    raise
                print(f"claim moved {report['moved']:.2f} s after SIGTERM; 200 MB done at {report['done']:.2f} s; "
                      f"node exited at {report['exit']:.2f} s; visitors served by the old/new session: "
                      f"{report['old']}/{report['new']}")
            drained = next(n for n in nodes if n.proc.returncode is not None)
            text = drained.text()
            assert "told 1 of 1 clients to move" in text, text[-3000:]
            assert "Traceback" not in text, text[-3000:]
        finally:
            for n in nodes:
                stop_by_pid(n.proc)
