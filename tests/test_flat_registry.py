"""Issue 14 row 8: the registry's answers on the handshake and stream-open paths come from indexes
kept up to date as sessions come and go (``LocalSessions``), not from a scan of every session:
the unnamed TCP ingress's "oldest established session that offers tcp", the session store's
lookups by id, and a client's own earlier sessions (``replace_own``). Each test checks the answers
(oldest claim first, established only) and that sessions that cannot be the answer are not even
looked at. Real sessions over real sockets on 127.0.0.1, both loops."""

from __future__ import annotations

import asyncio
import collections
import uuid
from typing import Any, Sequence

from conftest import tunnel
from ferrotunnel.aio.connection import TunnelConnection
from ferrotunnel.aio.session import Session
from ferrotunnel.config import StreamConfig
from ferrotunnel.protocol.extensions import INSTANCE_CAPABILITY
from ferrotunnel.server.admission import replace_own
from ferrotunnel.server.registry import LocalRegistry, LocalSessions, PoolRoute, SessionStore, first_with_capability

#: How often each counted session's ``id`` and ``capabilities`` were read.
READS: "collections.Counter[str]" = collections.Counter()


class Counted(Session):
    """A Session that counts the reads of its ``id``, ``tunnel_id`` and ``capabilities`` (by its name)."""

    def __init__(self, conn: Any, name: str, tunnel_id: str, caps: Sequence[str]) -> None:
        self.name = name
        super().__init__(conn, uuid.uuid4(), tunnel_id, None, caps)

    @property  # type: ignore[override]
    def id(self) -> uuid.UUID:
        READS[self.name] += 1
        return self.id_value

    @id.setter
    def id(self, value: uuid.UUID) -> None:
        self.id_value = value

    @property  # type: ignore[override]
    def tunnel_id(self) -> str:
        READS[self.name] += 1
        return self.tunnel_id_value

    @tunnel_id.setter
    def tunnel_id(self, value: str) -> None:
        self.tunnel_id_value = value

    @property  # type: ignore[override]
    def capabilities(self) -> Any:
        READS[self.name] += 1
        return self.caps_value

    @capabilities.setter
    def capabilities(self, value: Any) -> None:
        self.caps_value = value


def idle_conn() -> TunnelConnection:
    """A connection that never completed a handshake (its sessions are not established)."""
    return TunnelConnection(asyncio.get_running_loop(), StreamConfig())


def test_first_with_capability_keeps_claim_order_and_skips_the_rest_unread(run):
    async def body():
        async with tunnel(tunnel_id="a") as (_, _, sa), tunnel(tunnel_id="b") as (_, _, sb):
            reg = LocalRegistry()
            others = [Counted(idle_conn(), f"http{i}", f"h{i}", ("http",)) for i in range(200)]
            for s in others:
                assert (await reg.claim(s.tunnel_id, s)).granted
            pending = Counted(idle_conn(), "pending", "p", ("tcp",))  # offers tcp, not established
            a = Counted(sa.connection, "a", "a", ("tcp",))
            b = Counted(sb.connection, "b", "b", ("tcp",))
            for s in (pending, a, b):
                assert (await reg.claim(s.tunnel_id, s)).granted
            assert isinstance(reg.local_sessions(), LocalSessions) and len(reg.local_sessions()) == 203

            assert first_with_capability(reg, "tcp").session is a  # builds the index (one scan)
            READS.clear()
            for _ in range(5):
                assert first_with_capability(reg, "tcp").session is a
            assert not any(READS[s.name] for s in others), "sessions without tcp were looked at"

            await reg.release("a", a)  # the next oldest established one
            assert first_with_capability(reg, "tcp").session is b
            assert (await reg.claim("a", a)).granted  # claimed again: now the newest
            assert first_with_capability(reg, "tcp").session is b
            reg.session_ended(b)
            assert first_with_capability(reg, "tcp").session is a
            reg.session_ended(a)
            assert first_with_capability(reg, "tcp") is None  # "pending" is not established

            late = Counted(sb.connection, "late", "late", ("tcp", "special/1"))
            assert (await reg.claim("late", late)).granted  # indexed as it is claimed
            assert first_with_capability(reg, "tcp").session is late
            READS.clear()
            assert first_with_capability(reg, "special/1").session is late
            assert first_with_capability(reg, "special/1").session is late
            assert first_with_capability(reg, "nope") is None
            assert sum(READS[s.name] for s in others) == 400  # one scan per new capability, not per call
    run(body)


def test_pool_route_from_the_index(run):
    async def body():
        async with tunnel(tunnel_id="a") as (_, _, sa), tunnel(tunnel_id="b") as (_, _, sb):
            reg = LocalRegistry()
            m1 = Counted(sa.connection, "m1", "pool", ("tcp",))
            m2 = Counted(sb.connection, "m2", "pool", ("tcp",))
            solo = Counted(sb.connection, "solo", "solo", ("tcp",))
            for s, pool in ((m1, True), (solo, False), (m2, True)):
                assert (await reg.claim(s.tunnel_id, s, pool=pool)).granted
            route = first_with_capability(reg, "tcp")
            assert isinstance(route, PoolRoute) and route.members == [m1, m2]
            assert reg.local_sessions().holding("pool") == [m1, m2]
            await reg.release("pool", m1)
            assert reg.local_sessions().holding("pool") == [m2]
            route = first_with_capability(reg, "tcp")  # m2 is younger than solo
            assert not isinstance(route, PoolRoute) and route.session is solo
    run(body)


def test_pool_members_without_the_capability(run):
    async def body():
        async with tunnel(tunnel_id="a") as (_, _, sa), tunnel(tunnel_id="b") as (_, _, sb):
            reg = LocalRegistry()
            members = [Counted(sa.connection, "m0", "pool", ("tcp",))]
            members += [Counted(sb.connection, f"m{i}", "pool", ("tcp",)) for i in range(1, 50)]
            for m in members:
                assert (await reg.claim("pool", m, pool=True)).granted
            assert first_with_capability(reg, "tcp").members == members  # every member offers tcp
            READS.clear()
            for _ in range(5):
                assert isinstance(first_with_capability(reg, "tcp"), PoolRoute)
            assert not any(READS[m.name] for m in members[1:]), "the members were looked at for every stream"

            http = Counted(sb.connection, "http", "pool", ("http",))  # a live member without tcp
            assert (await reg.claim("pool", http, pool=True)).granted
            route = first_with_capability(reg, "tcp")
            assert not isinstance(route, PoolRoute) and route.session is members[0]  # the session alone
            idle = Counted(idle_conn(), "idle", "pool", ())  # not established: does not count
            await reg.release("pool", http)
            assert (await reg.claim("pool", idle, pool=True)).granted
            assert isinstance(first_with_capability(reg, "tcp"), PoolRoute)
            assert (await reg.claim("pool", http, pool=True)).granted
            assert not isinstance(first_with_capability(reg, "tcp"), PoolRoute)
            reg.session_ended(http)
            assert isinstance(first_with_capability(reg, "tcp"), PoolRoute)
    run(body)


def test_session_store_and_replace_own_do_not_scan(run):
    async def body():
        async with tunnel(tunnel_id="a") as (_, _, sa):
            reg = LocalRegistry()
            store = SessionStore(reg)
            others = [Counted(idle_conn(), f"o{i}", f"o{i}", ("tcp",)) for i in range(100)]
            for s in others:
                assert (await reg.claim(s.tunnel_id, s)).granted
            mine = f"{INSTANCE_CAPABILITY}=0123456789abcdef"
            old = Counted(sa.connection, "old", "x", ("tcp", mine))
            assert (await reg.claim("x", old)).granted
            READS.clear()
            assert store.get(old.id_value) is old and old in store and store.get(uuid.uuid4()) is None
            assert len(store) == 101
            replace_own(reg, "x", "fedcba9876543210")  # not the same client: stays
            assert store.get_by_tunnel_id("x") is old and not old.is_closed
            assert not any(READS[s.name] for s in others), "other sessions were looked at"
            replace_own(reg, "x", "0123456789abcdef")  # the same client again: its old session ends
            assert old.is_closed and store.get_by_tunnel_id("x") is None and old not in store
            assert not any(READS[s.name] for s in others)
            assert len(store) == 100 and list(store) == others  # oldest first
    run(body)
