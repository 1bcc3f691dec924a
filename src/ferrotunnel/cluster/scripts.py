"""The Lua scripts of the Redis registry: every decision that reads and then writes a key runs
as one script, so two nodes deciding about one tunnel id at once get one answer each, in order.
Times are Redis ``TIME`` in milliseconds (``now``), so the nodes' clocks do not matter.

A tunnel id is held either by one session (``node epoch session t``) or by a pool: ``pool`` = "1"
and, for every node holding at least one member, ``m:{node}`` = its epoch and ``t:{node}`` = when
it last refreshed. A pool's key expires ``claim_ttl`` after its last refresh by any node; a member
node not refreshed within ``claim_ttl``, dead or restarted no longer counts. A solo claim on a pool
(or a pool claim on a solo holder) is refused while it is held, like a solo claim on a solo one.

Lost records: ``{p}cluster`` (no TTL) holds the cluster's generation, set by the first script to
find it missing (the epoch of the node that ran it). Each node remembers the generation it last
saw; one that knew a generation and finds another (or none) knows Redis lost its data (restarted
empty, flushed) and sets ``{p}recovering`` (PX ``recovery_window``), as does a node whose writes
were refused until now (node keys may have expired while nobody could refresh them). Meanwhile a
claim (solo or pool) of an id Redis does not know, or one whose holder's node key is missing, is
"pending", and a lookup of an unknown id answers 1 ("recovering"): its owner may not have
re-asserted it yet. A node's own re-assertion passes. The scripts that may meet lost records take
the keys marker and window last, and after their own ARGV the tail ``RECOVERY_ARGS``."""

__all__ = ["SCRIPTS"]

_NOW = "local t = redis.call('TIME') local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) "

#: ``recovery(base)``: reads the tail of ARGV after ``base`` (re-assert "1"/"0", the generation this
#: node knows ('' if none), recovery_window ms, "1" if Redis refused this node's writes until now,
#: this node's epoch) and KEYS' last two (marker, window). Returns: recovering (and this is no
#: re-assertion), the current generation, and whether this call found the records lost.
_RECOVERY = """
local function recovery(base)
  local marker, window = KEYS[#KEYS - 1], KEYS[#KEYS]
  local known, ms = ARGV[base + 2], ARGV[base + 3]
  local cur = redis.call('GET', marker)
  if not cur then
    cur = ARGV[base + 5]
    redis.call('SET', marker, cur)
  end
  local found = known ~= '' and cur ~= known
  if found or ARGV[base + 4] == '1' then redis.call('SET', window, '1', 'PX', ms) end
  return ARGV[base + 1] ~= '1' and redis.call('EXISTS', window) == 1, cur, found
end
"""

#: ``members(key)``: {node, epoch, t} of every member node of a pool record. ``standing(prefix,
#: node, epoch, t, now, claim_ttl, stale claim ms, stale node ms, lost)``: 'dead', 'restarted',
#: 'draining', 'gone' (not refreshed within claim_ttl), 'pending' (and why) or 'held'.
_POOL_FNS = """
local function members(key)
  local f = redis.call('HGETALL', key)
  local epochs, times, out = {}, {}, {}
  for i = 1, #f, 2 do
    local kind, node = string.sub(f[i], 1, 2), string.sub(f[i], 3)
    if kind == 'm:' then epochs[node] = f[i + 1] elseif kind == 't:' then times[node] = tonumber(f[i + 1]) end
  end
  for node, epoch in pairs(epochs) do out[#out + 1] = {node, epoch, times[node] or 0} end
  return out
end
local function standing(prefix, node, epoch, at, now, ttl, stale_claim, stale_node, lost)
  local n = redis.call('HMGET', prefix .. node, 'epoch', 'state', 't')
  if not n[1] and lost then return 'pending', 'the registry may lack its node key (Redis recovering)' end
  if not n[1] then return 'dead' end
  if n[1] ~= epoch then return 'restarted' end
  if n[2] == 'draining' then return 'draining' end
  local claim_age, node_age = now - at, now - tonumber(n[3] or 0)
  if claim_age > ttl then return 'gone' end
  if claim_age > stale_claim then return 'pending', 'its claim was not refreshed for ' .. claim_age .. ' ms' end
  if node_age > stale_node then return 'pending', 'the node was silent for ' .. node_age .. ' ms' end
  return 'held'
end
"""

#: KEYS: claim, marker, recovery window. ARGV: node, epoch, session, claim_ttl ms, node key prefix,
#: stale claim ms, stale node ms, "1" if another claim of this node and epoch may be replaced, the
#: session's published access rules (``access_records``), then the recovery tail (``recovery(9)``).
#: {verdict, holder, why}; 'pool' when a pool holds it.
_CLAIM = _NOW + _POOL_FNS + _RECOVERY + """
local h = redis.call('HMGET', KEYS[1], 'node', 'epoch', 'session', 't')
local verdict, prev = 'granted', h[1]
local lost = recovery(9)
local lost_why = 'the registry may lack records (Redis restarted, or refused writes lately) and its nodes are '
  .. 're-asserting them'
if lost and not h[1] and redis.call('EXISTS', KEYS[1]) == 0 then return {'pending', '', lost_why} end
if redis.call('HEXISTS', KEYS[1], 'pool') == 1 then
  local pending
  for _, m in ipairs(members(KEYS[1])) do
    if m[1] == ARGV[1] and m[2] == ARGV[2] then
      if ARGV[8] ~= '1' then return {'mine', m[1], ''} end
    else
      local s, why = standing(ARGV[5], m[1], m[2], m[3], now, tonumber(ARGV[4]), tonumber(ARGV[6]), tonumber(ARGV[7]),
                              lost)
      if s == 'held' then return {'pool', m[1], ''} end
      if s == 'pending' then pending = {'pending', m[1], why} end
      if s ~= 'gone' then verdict, prev = s, m[1] end
    end
  end
  if pending then return pending end
  redis.call('DEL', KEYS[1])
elseif h[1] and h[1] == ARGV[1] and h[2] == ARGV[2] then
  if h[3] ~= ARGV[3] and ARGV[8] ~= '1' then return {'mine', h[1], ''} end
elseif h[1] then
  local n = redis.call('HMGET', ARGV[5] .. h[1], 'epoch', 'state', 't')
  if not n[1] and lost then return {'pending', h[1], lost_why}
  elseif not n[1] then verdict = 'dead'
  elseif n[1] ~= h[2] then verdict = 'restarted'
  elseif n[2] == 'draining' then verdict = 'draining'
  else
    local claim_age, node_age = now - tonumber(h[4] or 0), now - tonumber(n[3] or 0)
    local why = claim_age > tonumber(ARGV[6]) and ('its claim was not refreshed for ' .. claim_age .. ' ms')
      or node_age > tonumber(ARGV[7]) and ('the node was silent for ' .. node_age .. ' ms')
    if why then return {'pending', h[1], why} end
    return {'held', h[1], ''}
  end
end
redis.call('HSET', KEYS[1], 'node', ARGV[1], 'epoch', ARGV[2], 'session', ARGV[3], 't', now, 'access', ARGV[9])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {verdict, prev or '', ''}
"""

#: KEYS: claim. ARGV: node, epoch, session, claim_ttl ms, access rules. '' while ours (re-created,
#: rules included, if it expired: nobody else holds it), else the holder's node.
_REFRESH = _NOW + _POOL_FNS + """
if redis.call('HEXISTS', KEYS[1], 'pool') == 1 then local m = members(KEYS[1]) return m[1] and m[1][1] or 'a pool' end
local h = redis.call('HMGET', KEYS[1], 'node', 'epoch', 'session')
if h[1] and not (h[1] == ARGV[1] and h[2] == ARGV[2] and h[3] == ARGV[3]) then return h[1] end
redis.call('HSET', KEYS[1], 'node', ARGV[1], 'epoch', ARGV[2], 'session', ARGV[3], 't', now, 'access', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return ''
"""

#: ``refresh`` for many claims of one node in one call (a node refreshes all its claims every
#: ``claim_refresh``: one script call per key would cost Redis and the node several times more).
#: KEYS: claims. ARGV: node, epoch, claim_ttl ms, then one session per key, then one access rules
#: record per key. One answer per key.
_REFRESH_MANY = _NOW + _POOL_FNS + """
local out = {}
for i = 1, #KEYS do
  local h = redis.call('HMGET', KEYS[i], 'node', 'epoch', 'session')
  if redis.call('HEXISTS', KEYS[i], 'pool') == 1 then
    local m = members(KEYS[i])
    out[i] = m[1] and m[1][1] or 'a pool'
  elseif h[1] and not (h[1] == ARGV[1] and h[2] == ARGV[2] and h[3] == ARGV[3 + i]) then
    out[i] = h[1]
  else
    redis.call('HSET', KEYS[i], 'node', ARGV[1], 'epoch', ARGV[2], 'session', ARGV[3 + i], 't', now,
               'access', ARGV[3 + #KEYS + i])
    redis.call('PEXPIRE', KEYS[i], ARGV[3])
    out[i] = ''
  end
end
return out
"""

#: ``release`` of many claims of one node in one call. KEYS: claims. ARGV: node, epoch, then one
#: session per key. Returns how many were deleted.
_RELEASE_MANY = """
local n = 0
for i = 1, #KEYS do
  local h = redis.call('HMGET', KEYS[i], 'node', 'epoch', 'session')
  if h[1] == ARGV[1] and h[2] == ARGV[2] and h[3] == ARGV[2 + i] then n = n + redis.call('DEL', KEYS[i]) end
end
return n
"""

#: KEYS: a claim or a node key. ARGV: field, value, field, value... Compare-and-delete.
_RELEASE = """
for i = 1, #ARGV, 2 do if redis.call('HGET', KEYS[1], ARGV[i]) ~= ARGV[i + 1] then return 0 end end
return redis.call('DEL', KEYS[1])
"""

#: KEYS: node, marker, recovery window. ARGV: epoch, state, addr, node_ttl ms, then the recovery tail
#: (``recovery(4)``). {the epoch it replaced ('' if none), "1" if Redis lost its records (found by
#: this call), the cluster's generation}. ``rules`` = the epoch: this process publishes its
#: tunnels' access rules with its claims (a node of an older version does not, and guards its
#: tunnels itself).
_NODE = _NOW + _RECOVERY + """
local _, generation, found = recovery(4)
local prev = redis.call('HGET', KEYS[1], 'epoch')
redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'state', ARGV[2], 'addr', ARGV[3], 't', now, 'rules', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {prev or '', found and '1' or '', generation}
"""

#: KEYS: claim, marker, recovery window. ARGV: node key prefix, claim_ttl ms, then the recovery tail
#: (``recovery(2)``; never "refusing": a lookup works while Redis refuses writes). {node, addr, access rules, '1' if that node publishes
#: rules} when the claim's node is alive in that epoch, {node, ''} when that node is dead or
#: restarted (its client has yet to reconnect elsewhere). A pool: {'', '', node, addr, state, ...}
#: for every member node alive in its epoch. 1 for an unknown id while Redis recovers its records.
_LOOKUP = _NOW + _POOL_FNS + _RECOVERY + """
if redis.call('HEXISTS', KEYS[1], 'pool') == 1 then
  local out = {'', ''}
  for _, m in ipairs(members(KEYS[1])) do
    local n = redis.call('HMGET', ARGV[1] .. m[1], 'epoch', 'addr', 'state')
    if n[1] == m[2] and n[2] and (not ARGV[2] or now - m[3] <= tonumber(ARGV[2])) then
      out[#out + 1] = m[1]
      out[#out + 1] = n[2]
      out[#out + 1] = n[3] or 'up'
    end
  end
  return out
end
local h = redis.call('HMGET', KEYS[1], 'node', 'epoch', 'access')
if not h[1] then return recovery(2) and 1 or false end
local n = redis.call('HMGET', ARGV[1] .. h[1], 'epoch', 'addr', 'rules')
if n[1] ~= h[2] then return {h[1], ''} end
return {h[1], n[2] or '', h[3] or '', n[3] == h[2] and '1' or ''}
"""

#: KEYS: claim, marker, recovery window. ARGV: node, epoch, claim_ttl ms, node key prefix, stale
#: claim ms, stale node ms, then the recovery tail (``recovery(6)``).
#: Join (or start) the pool of this id as a member node. {verdict, holder, why}: 'solo' when one
#: session of another node holds it, 'pending' when that holder is stale, else granted (or taken
#: over from a dead / restarted / draining holder, or from this node's own solo claim: the node
#: checked its session before asking). Member nodes that are gone are forgotten.
_POOL_CLAIM = _NOW + _POOL_FNS + _RECOVERY + """
local h = redis.call('HMGET', KEYS[1], 'node', 'epoch', 't')
local verdict = 'granted'
local lost = recovery(6)
if lost and redis.call('EXISTS', KEYS[1]) == 0 then
  return {'pending', '', 'the registry may lack records (Redis restarted, or refused writes lately)'}
end
if h[1] then
  if not (h[1] == ARGV[1] and h[2] == ARGV[2]) then
    local s, why = standing(ARGV[4], h[1], h[2], tonumber(h[3] or 0), now, tonumber(ARGV[3]), tonumber(ARGV[5]),
                            tonumber(ARGV[6]), lost)
    if s == 'held' then return {'solo', h[1], ''} end
    if s == 'pending' then return {'pending', h[1], why} end
    verdict = s
  end
  redis.call('DEL', KEYS[1])
else
  for _, m in ipairs(members(KEYS[1])) do
    local s = standing(ARGV[4], m[1], m[2], m[3], now, tonumber(ARGV[3]), tonumber(ARGV[5]), tonumber(ARGV[6]), lost)
    if s == 'dead' or s == 'restarted' or s == 'gone' then redis.call('HDEL', KEYS[1], 'm:' .. m[1], 't:' .. m[1]) end
  end
end
redis.call('HSET', KEYS[1], 'pool', '1', 'm:' .. ARGV[1], ARGV[2], 't:' .. ARGV[1], now)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {verdict, h[1] or '', ''}
"""

#: KEYS: pool claims. ARGV: node, epoch, claim_ttl ms. For each: '' while this node is (or is
#: again: nobody else holds it) a member node, else the node of the solo session now holding it.
_POOL_REFRESH = _NOW + """
local out = {}
for i = 1, #KEYS do
  local holder = redis.call('HGET', KEYS[i], 'node')
  if holder then
    out[i] = holder
  else
    redis.call('HSET', KEYS[i], 'pool', '1', 'm:' .. ARGV[1], ARGV[2], 't:' .. ARGV[1], now)
    redis.call('PEXPIRE', KEYS[i], ARGV[3])
    out[i] = ''
  end
end
return out
"""

#: KEYS: pool claims. ARGV: node, epoch. Compare-and-delete of this node's membership (the key goes
#: with its last member node). Returns how many memberships were removed.
_POOL_RELEASE = _POOL_FNS + """
local n = 0
for i = 1, #KEYS do
  if redis.call('HGET', KEYS[i], 'm:' .. ARGV[1]) == ARGV[2] then
    redis.call('HDEL', KEYS[i], 'm:' .. ARGV[1], 't:' .. ARGV[1])
    n = n + 1
    if #members(KEYS[i]) == 0 then redis.call('DEL', KEYS[i]) end
  end
end
return n
"""

SCRIPTS = {"pool_claim": _POOL_CLAIM, "pool_refresh": _POOL_REFRESH, "pool_release": _POOL_RELEASE,
           "claim": _CLAIM, "refresh": _REFRESH, "release": _RELEASE, "node": _NODE, "lookup": _LOOKUP,
           "refresh_many": _REFRESH_MANY, "release_many": _RELEASE_MANY}
