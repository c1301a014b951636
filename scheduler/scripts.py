"""Lua scripts: the atomic multi-key changes of the scheduler. Each header documents KEYS/ARGV/return.

Load accounting lives in two hashes (booked prefill tokens and booked decode requests per node)
plus one ZSET of the individual bookings, member ``kind|node|req_id|amount`` scored by expiry ms.
A booking is released exactly once (ZREM decides), either by its owner (P after prefill, D on ack,
the frontend on re-dispatch/cancel) or by the sweep at the start of every dispatch once its expiry
passed, so a crashed releaser leaks load for at most the request TTL.
"""

from __future__ import annotations

# Shared Lua: release one booking member (returns the amount released, 0 if already gone).
_RELEASE_MEMBER = """
local function release_member(bookings, booked_p, booked_d, member)
  if redis.call('ZREM', bookings, member) == 0 then return 0 end
  local kind, node, _, amount = string.match(member, '^(%a)|([^|]+)|([^|]+)|(%d+)$')
  if not kind then return 0 end
  local hash = booked_d
  if kind == 'p' then hash = booked_p end
  local left = redis.call('HINCRBY', hash, node, -tonumber(amount))
  if left <= 0 then redis.call('HDEL', hash, node) end
  return tonumber(amount)
end
"""

DISPATCH = (
    _RELEASE_MEMBER
    + """
-- Pick the least-loaded live prefill/decode pair (or mixed node) and book it, atomically, so every
-- concurrent frontend sees the booking at once (no herd onto the same node).
-- KEYS[1] bookings ZSET          KEYS[2] booked prefill tokens HASH
-- KEYS[3] booked decode reqs HASH KEYS[4] request HASH
-- KEYS[4+i] heartbeat HASH of candidate i (same order as the candidate ARGVs)
-- ARGV[1] now ms   ARGV[2] booking/request expiry ms   ARGV[3] req_id   ARGV[4] prompt tokens
-- ARGV[5] rotation offset (random tie-break)   ARGV[6] frontend id   ARGV[7] attempt
-- ARGV[8] TTL ms for the accounting keys
-- ARGV[9+2(i-1)] candidate i node id, ARGV[10+2(i-1)] its role: 'm' | 'p' | 'd'
-- Returns {} when no pair is alive, else {mode, prefill id, prefill incarnation, decode id, decode incarnation}
local bookings, booked_p, booked_d, req = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now, expire_at, req_id = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local prompt, offset = tonumber(ARGV[4]), tonumber(ARGV[5])

local expired = redis.call('ZRANGEBYSCORE', bookings, '-inf', now, 'LIMIT', 0, 100)
for _, member in ipairs(expired) do release_member(bookings, booked_p, booked_d, member) end

local n = (#ARGV - 8) / 2
-- best prefill-only node by booked prompt tokens; best mixed node by booked tokens + requests
-- (its decode load matters too); best decode node by booked requests, then most free KV blocks.
local best_p, best_p_score, best_m, best_m_score, best_m_p, best_d, best_d_score
local inc = {}
for step = 0, n - 1 do
  local i = ((step + offset) % n) + 1
  local node, role = ARGV[7 + 2 * i], ARGV[8 + 2 * i]
  local hb = redis.call('HMGET', KEYS[4 + i], 'incarnation', 'free_kv_blocks')
  if hb[1] then
    inc[node] = hb[1]
    local p = tonumber(redis.call('HGET', booked_p, node) or '0')
    local d = tonumber(redis.call('HGET', booked_d, node) or '0')
    if role == 'p' and (not best_p_score or p < best_p_score) then best_p, best_p_score = node, p end
    if role == 'm' and (not best_m_score or p + d < best_m_score) then
      best_m, best_m_score, best_m_p = node, p + d, p
    end
    if role == 'd' then
      local s = d * 1e9 - tonumber(hb[2] or '0')
      if not best_d_score or s < best_d_score then best_d, best_d_score = node, s end
    end
  end
end

-- As in FastDeploy, mixed nodes compete with prefill nodes on queued prompt tokens; a mixed
-- winner serves the request alone.
local mode, p_node, d_node
local has_pair = best_p ~= nil and best_d ~= nil
if best_m and (not has_pair or best_m_p <= best_p_score) then
  mode, p_node, d_node = 'mixed', best_m, best_m
elseif has_pair then
  mode, p_node, d_node = 'disagg', best_p, best_d
else
  return {}
end

local pmember = 'p|' .. p_node .. '|' .. req_id .. '|' .. prompt
local dmember = 'd|' .. d_node .. '|' .. req_id .. '|1'
redis.call('ZADD', bookings, expire_at, pmember, expire_at, dmember)
redis.call('HINCRBY', booked_p, p_node, prompt)
redis.call('HINCRBY', booked_d, d_node, 1)
for _, key in ipairs({bookings, booked_p, booked_d}) do redis.call('PEXPIRE', key, ARGV[8]) end
redis.call('HSET', req, 'frontend', ARGV[6], 'attempt', ARGV[7], 'mode', mode, 'prefill', p_node,
  'decode', d_node, 'pbook', pmember, 'dbook', dmember, 'state', 'dispatched', 'prompt_tokens', prompt,
  'updated_ms', now)
redis.call('PEXPIREAT', req, expire_at + 60000)  -- history outlives the request by a minute
return {mode, p_node, inc[p_node], d_node, inc[d_node]}
"""
)

RELEASE = (
    _RELEASE_MEMBER
    + """
-- Release one request's booking (idempotent).
-- KEYS[1] bookings ZSET  KEYS[2] booked prefill tokens HASH  KEYS[3] booked decode reqs HASH
-- KEYS[4] request HASH
-- ARGV[1] 'pbook' | 'dbook'   ARGV[2] node id that must own the booking ('' = any)
-- ARGV[3] new request state ('' = leave as is)   ARGV[4] now ms
-- Returns the amount released (prompt tokens or 1), 0 when there was nothing to release.
local member = redis.call('HGET', KEYS[4], ARGV[1])
if ARGV[3] ~= '' and redis.call('EXISTS', KEYS[4]) == 1 then
  redis.call('HSET', KEYS[4], 'state', ARGV[3], 'updated_ms', ARGV[4])
end
if not member then return 0 end
if ARGV[2] ~= '' then
  local _, node = string.match(member, '^(%a)|([^|]+)|')
  if node ~= ARGV[2] then return 0 end
end
redis.call('HDEL', KEYS[4], ARGV[1])
return release_member(KEYS[1], KEYS[2], KEYS[3], member)
"""
)

HEARTBEAT = """
-- A node's heartbeat: (re-)register when its info is missing (first start, Redis restart, reaped),
-- refresh liveness and load, make sure its work stream and consumer group exist, refresh TTLs.
-- KEYS[1] nodes HASH  KEYS[2] this node's heartbeat HASH  KEYS[3] its work STREAM  KEYS[4] its control STREAM
-- ARGV[1] node id  ARGV[2] msgpack NodeInfo  ARGV[3] incarnation  ARGV[4] now ms
-- ARGV[5] dead-after ms (heartbeat expiry)  ARGV[6] TTL ms of the other keys  ARGV[7] consumer group
-- ARGV[8..] load report as field, value pairs
-- Returns 1 when the node was (re-)registered by this call, else 0.
local registered = 0
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  registered = 1
end
redis.call('HSET', KEYS[2], 'incarnation', ARGV[3], 'ts_ms', ARGV[4], unpack(ARGV, 8))
redis.call('PEXPIRE', KEYS[2], ARGV[5])
redis.pcall('XGROUP', 'CREATE', KEYS[3], ARGV[7], '0', 'MKSTREAM')
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('PEXPIRE', KEYS[3], ARGV[6])
if redis.call('EXISTS', KEYS[4]) == 1 then redis.call('PEXPIRE', KEYS[4], ARGV[6]) end
return registered
"""

DEREGISTER = """
-- Graceful node exit: forget the node now instead of waiting for its heartbeat to expire.
-- KEYS[1] nodes HASH  KEYS[2] heartbeat HASH
-- ARGV[1] node id  ARGV[2] incarnation (only that incarnation is removed)
-- Returns 1 when removed, 0 when another incarnation owns the id.
if redis.call('HGET', KEYS[2], 'incarnation') ~= ARGV[2] and redis.call('EXISTS', KEYS[2]) == 1 then
  return 0
end
redis.call('DEL', KEYS[2])
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
"""
