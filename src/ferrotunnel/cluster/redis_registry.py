"""``RedisRegistry``: the ``SessionRegistry`` of a cluster node, who owns which tunnel id in Redis.

Keys (``p``: ``key_prefix``; ``t``: Redis ``TIME`` in ms): ``{p}node:{node_id}`` hash ``epoch
state addr t`` PX ``node_ttl`` ("up"/"draining", link address, epoch fresh at every start) and
``{p}tunnel:{tunnel_id}`` hash ``node epoch session t access`` PX ``claim_ttl`` (``access``: the
session's rules as other nodes check them, see ``access_records``) (or a pool's record, see
``scripts`` and ``redis_pools``). Every read-then-write is one Lua script: ``claim`` (free, ours,
or held by a dead / restarted / draining node: take it; a stale holder: "pending"; else "held"),
``refresh`` and ``release`` (compare, then update or delete), ``node`` and ``lookup``. While Redis
is unreachable the node serves and grants locally, then re-asserts everything (where two nodes
granted one id, the claim in Redis stays).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
import weakref
from typing import Any, Awaitable, Callable, Collection, Coroutine, Dict, List, Optional, Set, Tuple

from ..aio.session import Session
from ..config import ClusterConfig, redact_url
from ..errors import ConnectionLostError
from ..server.registry import Claim, LocalRegistry, Route, StalePredicate
from .access_records import AccessKeys
from .redis_pools import PoolRecords, refusal
from .redis_base import RedisCalls, RedisDown, RegistryStats, as_text, connect, to_ms
from .redis_routes import RouteFactory, RouteLookup
from .scripts import SCRIPTS

__all__ = ["RedisRegistry", "RegistryStats", "RouteFactory", "connect"]

log = logging.getLogger("ferrotunnel.cluster")

_TAKEOVER = frozenset({"dead", "restarted", "draining"})
_BATCH = 500


class RedisRegistry:
    """A ``SessionRegistry`` shared by the nodes of a cluster through Redis (see the module doc).
    ``remote_route(node_id, (host, port), tunnel_id)`` makes a Route to a tunnel of another node
    (the node link supplies it; without it remote tunnels are not found). ``epoch``: fresh unless given;
    ``client``: ``connect(config)`` unless given. ``start()`` / ``close()`` run the tasks."""

    local_only = False

    def __init__(self, config: ClusterConfig, *, remote_route: Optional[RouteFactory] = None,
                 epoch: Optional[str] = None, client: Any = None) -> None:
        self.config = config
        self.node_id = config.node_id
        self.epoch = epoch or uuid.uuid4().hex
        self.stats = RegistryStats()
        self._own_client = client is None
        self._client: Any = client if client is not None else connect(config)
        self._scripts = {name: self._client.register_script(src) for name, src in SCRIPTS.items()}
        self._url = redact_url(config.redis_url)
        self._calls = RedisCalls(self._url, config.redis_timeout, self.stats)
        self._keys = AccessKeys(config.cluster_token)
        self._local = LocalRegistry()
        #: Where other nodes reach this node's link listener (read at every liveness refresh).
        self.advertise: Tuple[str, int] = config.node_advertise
        self._node_key = f"{config.key_prefix}node:{config.node_id}"
        self._marks = [f"{config.key_prefix}cluster", f"{config.key_prefix}recovering"]  # (see scripts)
        self._node_prefix = f"{config.key_prefix}node:"
        self._state = "up"
        self._stale: Optional[StalePredicate] = None
        self._unreconciled: Set[str] = set()  # ids granted without Redis' word: claim again
        self._moved: Set[uuid.UUID] = set()  # sessions whose id went to another node while draining
        self._orphans: Dict[str, str] = {}  # session id hex -> tunnel id, released while Redis was down
        self._gates: "weakref.WeakValueDictionary[str, asyncio.Lock]" = weakref.WeakValueDictionary()
        self._loops: List["asyncio.Task[None]"] = []
        self._background: Set["asyncio.Task[None]"] = set()
        self._wrote_node = False
        self._generation = ""  # the cluster's generation in Redis as this node last saw it (see scripts)
        self._closed = False
        #: The lookup side: routes to the tunnels of other nodes (see ``redis_routes``).
        self.routes = RouteLookup(config, self._local, self._keys, self._ask, self._gate, lambda: self._outage,
                                  remote_route)
        self._pools = PoolRecords(self._local, config, self.node_id, self.epoch, self._node_prefix, self._claim_key,
                                  self._run, self._batch, self.stats, self._lost, self._close_local,
                                  lambda reassert: (self._marks, self._recovery(reassert)))

    def __repr__(self) -> str:
        return (f"<RedisRegistry node={self.node_id!r} redis={self._url!r} {self._state}"
                f"{' outage' if self._outage else ''} claims={len(self._local.local_sessions())}>")

    @property
    def outage(self) -> bool:
        """True while Redis is unreachable (the node answers from its own sessions only)."""
        return self._outage

    @property
    def draining(self) -> bool:
        return self._state == "draining"

    def _claim_key(self, tunnel_id: str) -> str:
        return f"{self.config.key_prefix}tunnel:{tunnel_id}"

    @property
    def _outage(self) -> bool:
        return self._calls.outage

    def _call(self, fn: Callable[[], Awaitable[Any]], probe: bool = False) -> Awaitable[Any]:
        return self._calls.call(fn, probe)

    def _script(self, name: str, keys: List[str], args: List[Any]) -> Callable[[], Awaitable[Any]]:
        return lambda: self._scripts[name](keys=keys, args=args)

    def _run(self, name: str, keys: List[str], args: List[Any]) -> Awaitable[Any]:
        return self._call(self._script(name, keys, args))

    async def _batch(self, name: str, calls: List[Tuple[List[str], List[Any]]]) -> List[Any]:
        """Run one script for many keys, in pipelines of ``_BATCH`` (one round trip each)."""
        out: List[Any] = []
        for i in range(0, len(calls), _BATCH):
            pipe = self._client.pipeline(transaction=False)
            for keys, args in calls[i:i + _BATCH]:
                await self._scripts[name](keys=keys, args=args, client=pipe)
            out += await self._call(pipe.execute)
        return out

    def _claim_call(self, session: Session, replace_own: bool, reassert: bool = False) -> Tuple[List[str], List[Any]]:
        c = self.config
        return ([self._claim_key(session.tunnel_id)] + self._marks,
                [self.node_id, self.epoch, session.id.hex, to_ms(c.claim_ttl), self._node_prefix,
                 to_ms(2 * c.claim_refresh), to_ms(2 * c.node_refresh), "1" if replace_own else "0",
                 self._keys.session_record(self.node_id, session)] + self._recovery(reassert))

    def _recovery(self, reassert: bool, refusing: Optional[bool] = None) -> List[Any]:
        """The recovery tail of a script's ARGV (``scripts.recovery``); its KEYS end with ``_marks``."""
        refused = self._calls.refusing if refusing is None else refusing
        return ["1" if reassert else "0", self._generation, to_ms(self.config.window), "1" if refused else "0",
                self.epoch]

    def _owner(self, session_hex: str) -> List[Any]:
        return ["node", self.node_id, "epoch", self.epoch, "session", session_hex]

    def _refresh_args(self, session: Session) -> List[Any]:
        return [self.node_id, self.epoch, session.id.hex, to_ms(self.config.claim_ttl),
                self._keys.session_record(self.node_id, session)]

    async def _write_node(self, probing: bool = False) -> None:
        host, port = self.advertise
        addr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        args = [self.epoch, self._state, addr, to_ms(self.config.node_ttl)] + self._recovery(False)
        answer = await self._call(self._script("node", [self._node_key] + self._marks, args))
        prev, lost, generation = (as_text(v) for v in answer)
        if prev and prev != self.epoch and self._wrote_node:
            log.warning("registry: another process also runs as node %s (one node id twice?)", self.node_id)
        elif (lost or not prev) and self._wrote_node and not probing:  # (a probe re-asserts everything anyway)
            self._forgotten("Redis lost its records (restarted empty?)" if lost else "this node's liveness key expired",
                            bool(lost))
        self._wrote_node = True
        self._generation = generation
        if self._calls.writes_accepted() and (self._orphans or self._pools.orphans):  # (after refused writes)
            self._spawn(self._release_orphans())

    def _forgotten(self, why: str, lost: bool) -> None:
        """Redis no longer knew this node: re-assert every claim now (as after an outage). ``lost``:
        Redis lost its records (not only this node's key expired): visitors of ids not found meanwhile
        are told 503, not 404."""
        live = [s for s in list(self._local.local_sessions()) if not s.is_closed]
        log.warning("registry: %s; re-asserting %d claims", why, len(live))
        self.stats.reasserts += 1
        if lost:
            self.routes.recovering_until = time.monotonic() + self.config.window
        self._unreconciled |= {s.tunnel_id for s in live}
        self._spawn(self._reconcile_now())

    async def _reconcile_now(self) -> None:
        with contextlib.suppress(RedisDown):
            await self._reconcile([s for s in list(self._local.local_sessions()) if not s.is_closed])

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _gate(self, tunnel_id: str) -> asyncio.Lock:
        """One claim of a tunnel id at a time on this node: Redis and the local registry agree."""
        lock = self._gates.get(tunnel_id)
        if lock is None:
            lock = self._gates[tunnel_id] = asyncio.Lock()
        return lock

    async def claim(self, tunnel_id: str, session: Session, stale: Optional[StalePredicate] = None, *,
                    pool: bool = False) -> Claim:
        if stale is not None:
            self._stale = stale
        # a pool member joins beside the others (a stale one is replaced); a solo claim replaces
        # whatever the checks below left
        local_stale: StalePredicate = stale if pool and stale is not None else (lambda s: not pool)
        async with self._gate(tunnel_id):
            refused = self._local.refusal(tunnel_id, stale, pool=pool, session=session)
            if refused is not None:
                return refused if refused.reason else Claim(False, reason=f"tunnel id {tunnel_id} is in use on this node")
            call = self._pools.claim_call(tunnel_id) if pool else self._claim_call(session, True)
            try:
                answer = await self._call(self._script("pool_claim" if pool else "claim", *call))
            except RedisDown as down:  # granted here, claimed in Redis when it is back
                if down.refused:  # (Redis answers, but records nothing: no outage to reconcile after)
                    return Claim(False, retry_after=self.config.handover_retry, reason="the cluster registry "
                                 "refuses to record claims now (see the node's log)")
                self._unreconciled.add(tunnel_id)
                return self._local.claim_nowait(tunnel_id, session, local_stale, pool=pool)
            verdict, node, why = (as_text(v) for v in answer)
            if verdict == "held":
                return Claim(False, reason=f"held by node {node}")
            mismatch = refusal(verdict, node)
            if mismatch is not None:
                return mismatch
            if verdict == "pending":
                return Claim(False, retry_after=self.config.handover_retry,
                             reason=f"handover pending: node {node} holds it but {why}" if node
                             else f"handover pending: {why}")
            if verdict in _TAKEOVER:
                self.stats.takeovers += 1
                log.info("registry: tunnel %s taken over from node %s (%s)", tunnel_id, node, verdict)
            self._unreconciled.discard(tunnel_id)
            return self._local.claim_nowait(tunnel_id, session, local_stale, pool=pool)

    async def release(self, tunnel_id: str, session: Session) -> None:
        if self._local.get(session.id) is session:
            pool = self._local.is_pool(tunnel_id)
            await self._local.release(tunnel_id, session)
            await (self._pools.leave(tunnel_id) if pool else self._release_remote(tunnel_id, session.id.hex))

    def session_ended(self, session: Session) -> None:
        if self._local.get(session.id) is not session:
            return  # replaced (its id is claimed by the new session) or never granted
        tunnel_id = session.tunnel_id
        pool = self._local.is_pool(tunnel_id)
        self._local.session_ended(session)
        if self._closed or (pool and self._local.members(tunnel_id)):
            return  # a pool with members left here: this node stays a member node
        self._spawn(self._pools.leave(tunnel_id) if pool else self._release_remote(tunnel_id, session.id.hex))

    async def _release_remote(self, tunnel_id: str, session_hex: str) -> None:
        try:
            await self._call(self._script("release", [self._claim_key(tunnel_id)], self._owner(session_hex)))
        except RedisDown:
            self._orphans[session_hex] = tunnel_id

    async def refresh(self, tunnel_id: str, session: Session) -> bool:
        if not any(s is session for s in self._local.members(tunnel_id)):
            return False
        if self._local.is_pool(tunnel_id):
            try:
                return not (await self._pools.refresh([tunnel_id]))[0]
            except RedisDown:
                return True
        try:
            holder = as_text(await self._call(self._script(
                "refresh", [self._claim_key(tunnel_id)], self._refresh_args(session))))
        except RedisDown:
            return True  # nobody can say otherwise while Redis is away
        if holder:
            self._lost(session, holder)
        return not holder

    def _is_stale(self, session: Session) -> bool:
        if self._stale is not None:
            return self._stale(session)
        return session.silent_for(time.monotonic()) > 2 * self.config.claim_refresh

    def _close_local(self, session: Session, why: str) -> bool:
        if not any(s is session for s in self._local.members(session.tunnel_id)):
            return False  # replaced on this node meanwhile
        log.warning("registry: %s; closing session %s", why, session.id)
        self._local.session_ended(session)
        session.close(ConnectionLostError(why), tell_peer=True)
        return True

    def _lost(self, session: Session, holder: str) -> None:
        if self.draining:  # handed over: the old session finishes its streams (the client closes it)
            if session.id not in self._moved:
                self._moved.add(session.id)
                self.stats.handovers += 1
                log.info("registry: tunnel %s moved to node %s; its old session here finishes its %d streams",
                         session.tunnel_id, holder, len(session.multiplexer))
        elif self._close_local(session, f"tunnel id {session.tunnel_id} was taken over by node {holder}"):
            self.stats.lost += 1

    async def _refresh_all(self) -> None:
        live = [s for s in list(self._local.local_sessions()) if not s.is_closed]
        if self._unreconciled:
            await self._reconcile(live)
        due = [s for s in live if s.tunnel_id not in self._unreconciled and s.id not in self._moved
               and not self._is_stale(s)]
        mine = [s for s in due if not self._local.is_pool(s.tunnel_id)]
        await self._pools.refresh(sorted({s.tunnel_id for s in due if self._local.is_pool(s.tunnel_id)}))
        head = [self.node_id, self.epoch, to_ms(self.config.claim_ttl)]
        holders: List[Any] = []
        for i in range(0, len(mine), _BATCH):  # one script call per _BATCH claims, each within redis_timeout
            part = mine[i:i + _BATCH]
            holders += await self._call(self._script(
                "refresh_many", [self._claim_key(s.tunnel_id) for s in part],
                head + [s.id.hex for s in part] + [self._keys.session_record(self.node_id, s) for s in part]))
        for s, holder in zip(mine, holders):
            if self._local.get(s.id) is not s:  # ended meanwhile: its release may have run first
                await self._release_remote(s.tunnel_id, s.id.hex)
            elif as_text(holder):
                self._lost(s, as_text(holder))

    async def _reconcile(self, live: List[Session]) -> None:
        """Claim in Redis what was granted without it; another live node's claim stays (one owner)."""
        todo = [s for s in live if s.tunnel_id in self._unreconciled]
        self._unreconciled &= {s.tunnel_id for s in todo}
        pools = sorted({s.tunnel_id for s in todo if self._local.is_pool(s.tunnel_id)})
        todo = [s for s in todo if not self._local.is_pool(s.tunnel_id)]
        await self._pools.reconcile(pools, self._unreconciled)
        answers = await self._batch("claim", [self._claim_call(s, False, True) for s in todo])
        for s, answer in zip(todo, answers):
            verdict, node, _ = (as_text(v) for v in answer)
            if verdict == "mine":  # an older claim of this node (its session replaced or gone): take it
                async with self._gate(s.tunnel_id):
                    if self._local.local_session(s.tunnel_id) is not s:
                        continue  # replaced again meanwhile, in Redis too
                    answer = await self._call(self._script("claim", *self._claim_call(s, True, True)))
                verdict, node, _ = (as_text(v) for v in answer)
            if verdict == "pending":
                continue  # a stale holder: asked again at the next refresh
            self._unreconciled.discard(s.tunnel_id)
            if verdict in _TAKEOVER:
                self.stats.takeovers += 1
            elif verdict in ("held", "pool") and self._close_local(
                    s, f"tunnel id {s.tunnel_id} is held by node {node}; this session was accepted while Redis "
                       f"was unreachable and is closed so that one owner remains"):
                self.stats.conflicts += 1

    def lookup(self, tunnel_id: str) -> Awaitable[Optional[Route]]:
        return self.routes.lookup(tunnel_id)

    def _ask(self, tunnel_id: str) -> Awaitable[Any]:
        return self._run("lookup", [self._claim_key(tunnel_id)] + self._marks,
                         [self._node_prefix, to_ms(self.config.claim_ttl)] + self._recovery(False, refusing=False))

    def why_missing(self, tunnel_id: str) -> Optional[str]:
        """Why the last lookup of ``tunnel_id`` found no route when the tunnel may well exist (Redis
        down, or its node unreachable from here); None when there is no such tunnel."""
        return self.routes.why_missing(tunnel_id)

    def invalidate(self, tunnel_id: str) -> None:
        """Forget the cached route of ``tunnel_id`` (it failed): the next lookup asks Redis."""
        self.routes.invalidate(tunnel_id)

    def lookup_local(self, tunnel_id: str) -> Optional[Route]:
        return self._local.lookup_local(tunnel_id)

    def local_session(self, tunnel_id: str) -> Optional[Session]:
        return self._local.local_session(tunnel_id)

    def members(self, tunnel_id: str) -> List[Session]:
        """The local sessions holding ``tunnel_id`` (a pool's members here, or its one session)."""
        return self._local.members(tunnel_id)

    def local_sessions(self) -> Collection[Session]:
        return self._local.local_sessions()

    async def start(self) -> None:
        """Announce this node, start refreshing (Redis down is no error: the node serves locally)."""
        if self._loops:
            return
        with contextlib.suppress(RedisDown):
            await self._write_node()
        await self._check_eviction()
        self._loops = [asyncio.ensure_future(c) for c in (self._liveness_loop(), self._claims_loop())]

    async def _check_eviction(self) -> Optional[str]:
        """Warn (once, at start) when Redis may evict keys under memory pressure: a claim, a
        node's liveness or the cluster's generation marker evicted looks to the nodes like a dead
        node or an emptied Redis (takeovers, re-asserted claims). The warning, or None. Nothing
        when Redis is down or does not let CONFIG GET be run (a managed Redis may not)."""
        try:
            async with asyncio.timeout(self.config.redis_timeout):
                policy = await self._client.config_get("maxmemory-policy")
                limit = await self._client.config_get("maxmemory")
        except Exception as exc:  # (down, or the command refused: renamed, an ACL)
            log.debug("registry: cannot read Redis' eviction policy: %s", exc)
            return None
        policy_name = as_text(policy.get("maxmemory-policy", policy.get(b"maxmemory-policy")))
        bound = as_text(limit.get("maxmemory", limit.get(b"maxmemory")))
        if not policy_name or policy_name == "noeviction" or bound in ("", "0"):
            return None
        said = (f"Redis at {self._url} may evict keys (maxmemory {bound} bytes, maxmemory-policy {policy_name}): an "
                "evicted tunnel claim or node key makes the nodes take tunnels over or re-assert them; give the "
                "cluster a Redis with maxmemory-policy noeviction (or maxmemory 0)")
        log.warning("registry: %s", said)
        return said

    async def drain(self) -> None:
        """Mark this node draining: other nodes may take its tunnel ids over at once."""
        self._state = "draining"
        with contextlib.suppress(RedisDown):
            await self._write_node()

    # The loops check ``_closed``: on 3.11 redis-py's ``asyncio.wait_for`` can swallow a cancel.
    async def _liveness_loop(self) -> None:
        while not self._closed:
            if self._outage:
                await asyncio.sleep(self.config.redis_probe_interval)
                await self._probe()
            else:
                with contextlib.suppress(RedisDown):
                    await self._write_node()
                await asyncio.sleep(self.config.node_refresh if not self._outage else 0)

    async def _claims_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.config.claim_refresh)
            if not self._outage:
                with contextlib.suppress(RedisDown):
                    await self._refresh_all()

    async def _probe(self) -> None:
        """While Redis is down: PING it; once it answers, re-assert liveness and every claim."""
        with contextlib.suppress(RedisDown):
            await self._call(self._client.ping, probe=True)
            live = [s for s in list(self._local.local_sessions()) if not s.is_closed]
            # every node re-asserts within its own probe interval and refresh: until then a missing
            # claim may be one not re-asserted yet (503, not 404; set first: a visitor may come now)
            self.routes.recovering_until = time.monotonic() + self.config.redis_probe_interval + self.config.node_refresh
            self._calls.outage = False
            try:
                await self._write_node(probing=True)
            except RedisDown:  # it answers, but refuses writes: not back yet (the next probe tries again)
                self._calls.outage = True
                raise
            log.info("registry: Redis at %s is back; re-asserting %d claims", self._url, len(live))
            self._unreconciled |= {s.tunnel_id for s in live}
            await self._reconcile(live)
            await self._release_orphans()

    async def _release_orphans(self) -> None:
        """Release what this node let go of while Redis could not record it."""
        orphans, self._orphans = self._orphans, {}
        for session_hex, tunnel_id in orphans.items():
            await self._release_remote(tunnel_id, session_hex)
        await self._pools.leave_orphans()

    async def close(self, *, release: bool = True) -> None:
        """Stop the tasks; release this node's claims and liveness key (best effort, within
        ``redis_timeout``). ``release=False`` leaves them to expire, as a crash would."""
        self._closed = True
        self.routes.cancel()
        while not all(t.done() for t in self._loops):  # again if a cancel was lost (see the loops)
            for task in self._loops:
                task.cancel()
            await asyncio.wait(self._loops, timeout=0.05)
        if self._background:
            await asyncio.wait(self._background, timeout=self.config.redis_timeout)
        for task in list(self._background):
            task.cancel()
        if release and not self._outage:
            pools = sorted({s.tunnel_id for s in self._local.local_sessions() if self._local.is_pool(s.tunnel_id)})
            sessions = [s for s in self._local.local_sessions() if s.tunnel_id not in pools]
            with contextlib.suppress(RedisDown):
                await self._pools.release_all(pools)
                for i in range(0, len(sessions), _BATCH):  # each call within redis_timeout
                    part = sessions[i:i + _BATCH]
                    await self._call(self._script("release_many", [self._claim_key(s.tunnel_id) for s in part],
                                                  [self.node_id, self.epoch] + [s.id.hex for s in part]))
                await self._call(self._script("release", [self._node_key], ["epoch", self.epoch]))
        if self._own_client:
            with contextlib.suppress(Exception):
                await self._client.aclose()

    async def __aenter__(self) -> "RedisRegistry":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
