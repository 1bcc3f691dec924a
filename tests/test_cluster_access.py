"""Per-tunnel access rules across cluster nodes: a visitor who lands on a node that does not hold
the tunnel is checked there (basic auth included, the Authorization field removed before the
request crosses the node link), against the rules the owning node published in Redis as a keyed
MAC, never the client's digest; the owning node still enforces the allow list and takes a
basic-auth stream only when the ingress node says it checked the rules it holds now; rules that do
not verify are never served unguarded. Real redis-server, real nodes, both loops."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from typing import Dict, Optional, Tuple

import pytest

import ferrotunnel as ft
from ferrotunnel.access import KeyedAccess, TunnelAccess, basic_auth_digest

from inproc_nodes import InProcessNode
from redis_server import RedisServer

TOKEN = "cluster-access-token"
SECRET = "cluster-access-secret"
CREDS = "alice:s3cret"


async def _head_app():
    """An HTTP/1.1 app that answers every request (keep-alive) with the request head it got."""

    async def handle(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(head), head))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[:2]


class Node(InProcessNode):
    def __init__(self, name: str, redis_url: str, **timing: float) -> None:
        super().__init__(name, redis_url, token=TOKEN, secret=SECRET, key_prefix="acc:",
                         **{"route_cache_ttl": 0.1, **timing})


def _auth(creds: str) -> str:
    return "Authorization: Basic " + base64.b64encode(creds.encode()).decode() + "\r\n"


async def _read_response(reader: asyncio.StreamReader) -> Tuple[bytes, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 15)
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head, await asyncio.wait_for(reader.readexactly(length), 15)


async def _get(addr, host: str, auth: Optional[str] = None) -> Tuple[bytes, bytes]:
    r, w = await asyncio.open_connection(*addr)
    try:
        w.write(f"GET /x HTTP/1.1\r\nHost: {host}\r\n{_auth(auth) if auth else ''}\r\n".encode())
        return await _read_response(r)
    finally:
        w.close()


class _Cluster:
    """Nodes a and b on one Redis; a client of tunnel ``web`` on b with ``config``."""

    def __init__(self, redis_url: str, config: ft.ClientConfig, **timing: float) -> None:
        self.a, self.b = Node("a", redis_url, **timing), Node("b", redis_url, **timing)
        self.config = config
        self.redis_url = redis_url

    async def __aenter__(self) -> "_Cluster":
        self.app, app_addr = await _head_app()
        await self.a.start()
        await self.b.start()
        self.client = ft.TunnelClient("%s:%d" % self.b.server.address, TOKEN, tunnel_id="web",
                                      config=_with_local(self.config, app_addr))
        self.task = asyncio.create_task(self.client.connect_and_run())
        await self.b.server.wait_for_session("web", timeout=10)
        return self

    async def __aexit__(self, *exc) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.client.close()
        await self.a.close()
        await self.b.close()
        self.app.close()

    async def claim(self) -> Dict[str, str]:
        import redis.asyncio as aioredis

        r = aioredis.from_url(self.redis_url, decode_responses=True)
        try:
            return await r.hgetall("acc:tunnel:web")
        finally:
            await r.aclose()

    async def set_record(self, value: Optional[str]) -> None:
        import redis.asyncio as aioredis

        r = aioredis.from_url(self.redis_url)
        try:
            if value is None:
                await r.hdel("acc:tunnel:web", "access")
            else:
                await r.hset("acc:tunnel:web", "access", value)
        finally:
            await r.aclose()


def _with_local(config: ft.ClientConfig, addr) -> ft.ClientConfig:
    import dataclasses

    return dataclasses.replace(config, local_addr=addr)


def test_basic_auth_is_checked_at_the_node_where_the_visitor_lands(run):
    async def body():
        with RedisServer() as redis:
            async with _Cluster(redis.url, ft.ClientConfig(basic_auth=CREDS)) as c:
                a = c.a.http.address
                head, seen = await _get(a, "web", CREDS)
                assert head.startswith(b"HTTP/1.1 200"), head
                assert seen.startswith(b"GET /x HTTP/1.1") and b"authorization" not in seen.lower(), seen
                for creds in (None, "alice:wrong", "bob:s3cret"):
                    head, text = await _get(a, "web", creds)
                    assert head.startswith(b"HTTP/1.1 401"), (creds, head)
                    assert b'WWW-Authenticate: Basic realm="ferrotunnel"' in head, head
                assert c.a.http.refused.get("401") == 3
                # every request of a kept-alive connection is checked: the second, wrong, gets 401
                r, w = await asyncio.open_connection(*a)
                w.write(f"GET /1 HTTP/1.1\r\nHost: web\r\n{_auth(CREDS)}\r\n".encode())
                head, seen = await _read_response(r)
                assert head.startswith(b"HTTP/1.1 200") and b"authorization" not in seen.lower()
                w.write(f"GET /2 HTTP/1.1\r\nHost: web\r\n{_auth('alice:nope')}\r\n".encode())
                head, _ = await _read_response(r)
                assert head.startswith(b"HTTP/1.1 401"), head
                w.close()
                # the 401s were answered at a: only the two admitted requests' streams crossed to b
                links_in = c.b.node.links_in.streams
                assert links_in["joined"] == 2 and links_in["refused_access"] == 0, links_in
                # the owning node answers its own visitors as before
                assert (await _get(c.b.http.address, "web", CREDS))[0].startswith(b"HTTP/1.1 200")
                assert (await _get(c.b.http.address, "web"))[0].startswith(b"HTTP/1.1 401")
    run(body, timeout=90)


def test_redis_never_holds_the_clients_digest(run):
    async def body():
        with RedisServer() as redis:
            async with _Cluster(redis.url, ft.ClientConfig(basic_auth=CREDS)) as c:
                claim = await c.claim()
                record = claim["access"]
                sha = hashlib.sha256(CREDS.encode()).digest()
                everything = "".join(f"{k}={v}" for k, v in claim.items())
                for form in (basic_auth_digest(CREDS), sha.hex(), base64.b64encode(sha).decode().rstrip("="),
                             CREDS, "s3cret"):
                    assert form not in everything, form
                assert record.startswith("1.") and '"auth":"' in record  # a MAC stands in its place
                # the MAC is keyed: without the cluster secret it cannot be recomputed from a guess
                assert hashlib.sha256(sha).hexdigest() not in record
    run(body, timeout=60)


def test_allow_list_refuses_at_the_node_where_the_visitor_lands(run):
    async def body():
        with RedisServer() as redis:
            async with _Cluster(redis.url, ft.ClientConfig(allow=("10.0.0.0/8",))) as c:
                head, _ = await _get(c.a.http.address, "web")
                assert head.startswith(b"HTTP/1.1 403"), head
                assert c.a.http.refused.get("403") == 1
                assert c.b.node.links_in.streams["joined"] == 0  # refused before crossing
            async with _Cluster(redis.url, ft.ClientConfig(allow=("127.0.0.0/8",), basic_auth=CREDS)) as c:
                head, seen = await _get(c.a.http.address, "web", CREDS)
                assert head.startswith(b"HTTP/1.1 200") and b"authorization" not in seen.lower(), head
    run(body, timeout=90)


def test_a_protocol_restricted_tunnel_is_not_served_at_the_other_kind_on_another_node(run):
    async def body():
        with RedisServer() as redis:
            async with _Cluster(redis.url, ft.ClientConfig(protocol="tcp")) as c:
                head, _ = await _get(c.a.http.address, "web")
                assert head.startswith(b"HTTP/1.1 404"), head
                assert c.b.node.links_in.streams["joined"] == 0
    run(body, timeout=60)


@pytest.mark.parametrize("tamper", ["changed", "missing", "other-node"])
def test_rules_that_do_not_verify_are_not_served(run, tamper, caplog):
    """A record changed in Redis (or gone) makes the tunnel unreachable from other nodes (503),
    never served unguarded; the owner's next refresh writes it again."""
    async def body():
        with RedisServer() as redis:
            async with _Cluster(redis.url, ft.ClientConfig(basic_auth=CREDS), claim_ttl=60.0, claim_refresh=30.0) as c:
                record = (await c.claim())["access"]
                if tamper == "changed":  # a MAC for a password the attacker chose cannot be made: any edit fails
                    assert '"only":null' in record
                    await c.set_record(record.replace('"only":null', '"only":"http"'))
                elif tamper == "missing":
                    await c.set_record(None)
                else:  # a's own record for the same rules and id does not stand for b's
                    from ferrotunnel.cluster.access_records import AccessKeys

                    await c.set_record(AccessKeys(SECRET).record("web", "a", TunnelAccess.build(basic_auth=CREDS)))
                caplog.set_level("WARNING", logger="ferrotunnel.cluster")
                for _ in range(3):
                    head, text = await _get(c.a.http.address, "web", CREDS)
                    assert head.startswith(b"HTTP/1.1 503"), head
                    assert b"access rules" in text, text
                assert c.b.node.links_in.streams["joined"] == 0
                said = [r.getMessage() for r in caplog.records if "not served here" in r.getMessage()]
                assert len(said) == 1, said  # once, not per visitor
                assert basic_auth_digest(CREDS) not in caplog.text and SECRET not in caplog.text
    run(body, timeout=60)


def test_a_node_that_does_not_publish_rules_guards_its_tunnels_itself(run):
    """A claim without rules from a node that does not say it publishes them (an older version,
    in a rolling upgrade) is served from other nodes as before: unchecked there, the owner's own
    checks decide. Once the node says it publishes rules, a claim without them is not served."""
    async def body():
        import redis.asyncio as aioredis

        slow = {"node_ttl": 60.0, "node_refresh": 25.0, "claim_ttl": 60.0, "claim_refresh": 25.0}
        with RedisServer() as redis:
            async with _Cluster(redis.url, ft.ClientConfig(), **slow) as c:
                r = aioredis.from_url(c.redis_url)
                try:
                    await c.set_record(None)
                    await r.hdel("acc:node:b", "rules")
                    head, _ = await _get(c.a.http.address, "web")
                    assert head.startswith(b"HTTP/1.1 200"), head
                    await r.hset("acc:node:b", "rules", (await r.hget("acc:node:b", "epoch")))
                    await asyncio.sleep(0.3)  # a's cached route expires
                    head, _ = await _get(c.a.http.address, "web")
                    assert head.startswith(b"HTTP/1.1 503"), head
                finally:
                    await r.aclose()
    run(body, timeout=60)


def test_rules_erased_in_redis_still_leave_the_owner_guarding(run):
    """Redis says "no rules": the ingress node forwards unchecked, and the owner refuses the stream
    (its basic auth was not checked), so the app never sees the request."""
    async def body():
        with RedisServer() as redis:
            async with _Cluster(redis.url, ft.ClientConfig(basic_auth=CREDS), claim_ttl=60.0, claim_refresh=30.0) as c:
                await c.set_record("none")
                try:
                    head, _ = await _get(c.a.http.address, "web")
                except (asyncio.IncompleteReadError, ConnectionError):
                    head = b""
                assert not head.startswith(b"HTTP/1.1 200"), head
                assert c.b.node.links_in.streams["refused_access"] == 1
                assert c.b.node.links_in.streams["joined"] == 0
    run(body, timeout=60)


def test_a_claim_that_expired_comes_back_with_its_rules(run):
    """The owner's refresh re-creates an expired claim (nobody else took it) with its rules."""
    async def body():
        with RedisServer() as redis:
            async with _Cluster(redis.url, ft.ClientConfig(basic_auth=CREDS)) as c:
                before = await c.claim()
                await c.set_record(None)
                import redis.asyncio as aioredis

                r = aioredis.from_url(c.redis_url)
                await r.delete("acc:tunnel:web")  # as if it had expired
                await r.aclose()
                for _ in range(100):
                    after = await c.claim()
                    if after.get("session"):
                        break
                    await asyncio.sleep(0.1)
                assert after.get("access") == before["access"], after
                head, seen = await _get(c.a.http.address, "web", CREDS)
                assert head.startswith(b"HTTP/1.1 200") and b"authorization" not in seen.lower(), head
    run(body, timeout=60)


@pytest.mark.parametrize("tag", [None, "0" * 64, "é" * 64])
def test_the_owner_refuses_a_basic_auth_stream_without_the_right_tag(run, tag):
    async def body():
        from ferrotunnel.cluster.access_records import Published
        from ferrotunnel.cluster.links import LinkPool

        with RedisServer() as redis:
            async with _Cluster(redis.url, ft.ClientConfig(basic_auth=CREDS)) as c:
                pool = LinkPool("z", SECRET)
                try:
                    published = None if tag is None else Published(
                        KeyedAccess(None, "0" * 64, key=b"k"), tag)
                    route = await pool.route("b", c.b.node.link_address, "web", published)
                    s = route.open_stream_nowait(ft.Protocol.HTTP, ft.StreamPriority.NORMAL, ("127.0.0.1", 5))
                    s.write(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
                    with pytest.raises(ft.FerroTunnelError):
                        await asyncio.wait_for(s.read(), 10)
                    assert c.b.node.links_in.streams["refused_access"] == 1
                    assert c.b.node.links_in.streams["joined"] == 0
                finally:
                    await pool.close()
    run(body, timeout=60)


@pytest.mark.parametrize("rules", ["allow", "only"])
def test_the_owner_enforces_allow_and_protocol_on_link_streams(run, rules):
    """Whatever the ingress node did, the node that holds the tunnel refuses a link stream from
    outside the allow list or of the other ingress kind, and joins one that its rules admit."""
    async def body():
        from ferrotunnel.cluster.links import LinkPool

        config = ft.ClientConfig(allow=("10.0.0.0/8",)) if rules == "allow" else ft.ClientConfig(protocol="tcp")
        with RedisServer() as redis:
            async with _Cluster(redis.url, config) as c:
                pool = LinkPool("z", SECRET)
                try:
                    route = await pool.route("b", c.b.node.link_address, "web")
                    bad, good = (((ft.Protocol.HTTP, ("127.0.0.1", 5)), (ft.Protocol.HTTP, ("10.1.2.3", 5)))
                                 if rules == "allow" else
                                 ((ft.Protocol.HTTP, ("10.1.2.3", 5)), (ft.Protocol.TCP, ("10.1.2.3", 5))))
                    s = route.open_stream_nowait(bad[0], ft.StreamPriority.NORMAL, bad[1])
                    s.write(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
                    with pytest.raises(ft.FerroTunnelError):
                        await asyncio.wait_for(s.read(), 10)
                    assert c.b.node.links_in.streams["refused_access"] == 1
                    s = route.open_stream_nowait(good[0], ft.StreamPriority.NORMAL, good[1])
                    s.write(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
                    s.write_eof()
                    assert (await asyncio.wait_for(s.read(), 10)).startswith(b"HTTP/1.1 200")
                    assert c.b.node.links_in.streams["joined"] == 1
                finally:
                    await pool.close()
    run(body, timeout=60)


def test_records_round_trip_and_bind_tunnel_node_and_secret():
    from ferrotunnel.cluster.access_records import NO_RULES, SEALED, AccessKeys, UnreadableRules

    keys = AccessKeys(SECRET)
    access = TunnelAccess.build("http", CREDS, ("10.0.0.0/8", "2001:db8::/32"))
    record = keys.record("web", "b", access)
    got = keys.read("web", "b", record.encode())
    assert isinstance(got.access, KeyedAccess)
    assert (got.access.only, got.access.allow) == (access.only, access.allow)
    assert got.tag == keys.checked_tag("web", "b", access)
    good = b"Basic " + base64.b64encode(CREDS.encode())
    assert got.access.authorized(good) and not got.access.authorized(b"Basic " + base64.b64encode(b"alice:x"))
    assert not got.access.authorized(None) and not got.access.authorized(b"Bearer x")
    assert "key" not in repr(got.access) and got.access.digest not in repr(got) and SECRET not in repr(keys)
    for reader, tid, node in ((keys, "web2", "b"), (keys, "web", "a"), (AccessKeys("other-secret"), "web", "b"),
                              (AccessKeys(""), "web", "b")):
        with pytest.raises(UnreadableRules):
            reader.read(tid, node, record)
    for bad in (None, "", SEALED, "1." + "0" * 64 + ".{}", "2" + record[1:], record[:-3], "x" * 5000):
        with pytest.raises(UnreadableRules):
            keys.read("web", "b", bad)
    assert keys.read("web", "b", NO_RULES).access is None
    assert keys.read("web", "b", None, publishes=False).access is None
    assert keys.read("web", "b", b"", publishes=False).access is None
    with pytest.raises(UnreadableRules):  # a node that does not publish cannot vouch for rules either
        keys.read("web", "b", "1." + "0" * 64 + ".{}", publishes=False)
    assert keys.record("web", "b", None) == NO_RULES and AccessKeys("").record("web", "b", access) == SEALED
    assert keys.checked_tag("web", "b", None) is None
    # one password, two tunnels: two different MACs (Redis does not tell that they share it)
    assert keys.record("web", "b", access).split('"auth":')[1] != keys.record("api", "b", access).split('"auth":')[1]
