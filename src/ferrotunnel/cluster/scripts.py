"""The Lua scripts of the Redis registry: every decision that reads and then writes a key runs
as one script, so two nodes deciding about one tunnel id at once get one answer each, in order.
Times are Redis ``TIME`` in milliseconds (``now``), so the nodes' clocks do not matter."""

__all__ = ["SCRIPTS"]

_NOW = "local t = redis.call('TIME') local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) "

#: KEYS: claim. ARGV: node, epoch, session, claim_ttl ms, node key prefix, stale claim ms, stale
#: node ms, "1" if another claim of this node and epoch may be replaced. {verdict, holder, why}.
_CLAIM = _NOW + """
local h = redis.call('HMGET', KEYS[1], 'node', 'epoch', 'session', 't')
local verdict = 'granted'
if h[1] and h[1] == ARGV[1] and h[2] == ARGV[2] then
  if h[3] ~= ARGV[3] and ARGV[8] ~= '1' then return {'mine', h[1], ''} end
elseif h[1] then
  local n = redis.call('HMGET', ARGV[5] .. h[1], 'epoch', 'state', 't')
  if not n[1] then verdict = 'dead'
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
redis.call('HSET', KEYS[1], 'node', ARGV[1], 'epoch', ARGV[2], 'session', ARGV[3], 't', now)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {verdict, h[1] or '', ''}
"""

#: KEYS: claim. ARGV: node, epoch, session, claim_ttl ms. '' while ours (re-created if it expired:
#: nobody else holds it), else the holder's node.
_REFRESH = _NOW + """
local h = redis.call('HMGET', KEYS[1], 'node', 'epoch', 'session')
if h[1] and not (h[1] == ARGV[1] and h[2] == ARGV[2] and h[3] == ARGV[3]) then return h[1] end
redis.call('HSET', KEYS[1], 'node', ARGV[1], 'epoch', ARGV[2], 'session', ARGV[3], 't', now)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return ''
"""

#: ``refresh`` for many claims of one node in one call (a node refreshes all its claims every
#: ``claim_refresh``: one script call per key would cost Redis and the node several times more).
#: KEYS: claims. ARGV: node, epoch, claim_ttl ms, then one session per key. One answer per key.
_REFRESH_MANY = _NOW + """
local out = {}
for i = 1, #KEYS do
  local h = redis.call('HMGET', KEYS[i], 'node', 'epoch', 'session')
  if h[1] and not (h[1] == ARGV[1] and h[2] == ARGV[2] and h[3] == ARGV[3 + i]) then
    out[i] = h[1]
  else
    redis.call('HSET', KEYS[i], 'node', ARGV[1], 'epoch', ARGV[2], 'session', ARGV[3 + i], 't', now)
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

#: KEYS: node. ARGV: epoch, state, addr, node_ttl ms. Returns the epoch it replaced ('' if none).
_NODE = _NOW + """
local prev = redis.call('HGET', KEYS[1], 'epoch')
redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'state', ARGV[2], 'addr', ARGV[3], 't', now)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return prev or ''
"""

#: KEYS: claim. ARGV: node key prefix. {node, addr} when the claim's node is alive in that epoch,
#: {node, ''} when that node is dead or restarted (its client has yet to reconnect elsewhere).
_LOOKUP = """
local h = redis.call('HMGET', KEYS[1], 'node', 'epoch')
if not h[1] then return false end
local n = redis.call('HMGET', ARGV[1] .. h[1], 'epoch', 'addr')
if n[1] ~= h[2] then return {h[1], ''} end
return {h[1], n[2]}
"""

SCRIPTS = {"claim": _CLAIM, "refresh": _REFRESH, "release": _RELEASE, "node": _NODE, "lookup": _LOOKUP,
           "refresh_many": _REFRESH_MANY, "release_many": _RELEASE_MANY}
