"""Lua scripts: the atomic multi-key changes of the scheduler. Each header documents KEYS/ARGV/return.

Load lives in per-group, per-role candidate sorted sets (member ``node_id|incarnation``, score =
load), so a pick reads a bounded sample of the least-loaded members whatever the cluster size.
Liveness is one sorted set of leases (score = expiry in Redis server ms). Individual bookings are
members ``kind|group|node|inc|req_id|attempt|amount`` of one ZSET scored by expiry ms. A booking is
released exactly once (ZREM decides), by its owner or by the frontends' sweep once it expired, so a
crashed releaser leaks load for at most the request TTL. Every key of one call shares the topic's
hash tag (one Redis Cluster slot), and every key a script touches is passed in KEYS.
"""

from __future__ import annotations

from scheduler.scripting import LuaScript

# Decode scores: booked requests in the high part, fewer free KV blocks in the low part, so the
# least-booked node wins and, among equals, the one with the most free blocks.
DECODE_BOOKING_UNIT = 1 << 20

DISPATCH = LuaScript(
    "dispatch",
    """
-- Pick the least-loaded live prefill/decode pair (or mixed node) of one compatibility group and
-- book it, atomically, so every concurrent frontend sees the booking at once (no herd).
-- KEYS[1] alive ZSET  KEYS[2] bookings ZSET
-- KEYS[3] prefill candidates ZSET  KEYS[4] decode candidates ZSET  KEYS[5] mixed candidates ZSET
-- ARGV[1] now (Redis server ms)  ARGV[2] booking expiry ms  ARGV[3] req_id  ARGV[4] attempt
-- ARGV[5] prompt tokens  ARGV[6] roles present in the group ('p','d','m' letters)
-- ARGV[7] sample size k  ARGV[8] random seed (tie-break)  ARGV[9] group id
-- ARGV[10] decode booking unit
-- ARGV[11] min prefill tokens, ARGV[12] max prefill queue (conditional disaggregation; 0: off)
-- ARGV[13] prefill overlap weight  ARGV[14] decode overlap weight  ARGV[15] prefix-index key head
-- ARGV[16] block size  ARGV[17..] the prompt's leading block hashes (KV-aware scoring; none: off)
-- Cost: one ZRANGE of k members per role present, one ZMSCORE, one ZADD, one ZADD INCR per booked
-- node, whatever the number of nodes. Members whose lease lapsed are removed from their candidate
-- set and the alive set (their next heartbeat re-registers them), so they are paid for once.
-- Returns {} when no live pair or mixed node exists, else {mode, prefill member, decode member};
-- mode 'local/<why>' books the decode node alone, which then prefills locally. A disaggregated
-- pick with hashes also returns the cached prefix blocks of P and of D found in the index and the
-- prompt tokens booked on P (with a prefill weight set: the uncached part only).
local alive, bookings = KEYS[1], KEYS[2]
local now, expire_at, req_id, attempt = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4]
local prompt, roles, k, seed, group = tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8]), ARGV[9]
local unit = tonumber(ARGV[10])
local min_prefill, max_queue = tonumber(ARGV[11] or 0), tonumber(ARGV[12] or 0)

-- KV-aware scoring (#15), a section of its own: a candidate's score is its load minus what its
-- cached prefix saves, found in its prefix index {t}:pfx:<node> (a SET of block hashes; the keys
-- are built here from the sampled members, under the topic's hash tag, so one slot):
--   prefill: booked prompt tokens - w_p * cached prefix tokens (the prefill work it would do)
--   decode:  its load score - w_d * (cached blocks / hashed blocks) * booking unit
--            (a D holding the whole prefix is worth w_d fewer booked requests)
-- The cached prefix is found by binary search over the hashes (a chain: a cache holds a block's
-- prefix whenever it holds the block, eviction taking the tail first): O(log n) per candidate.
local w_p, w_d = tonumber(ARGV[13] or 0), tonumber(ARGV[14] or 0)
local pfx_head, block_size = ARGV[15] or '', tonumber(ARGV[16] or 0)
local hashes = {}
for i = 17, #ARGV do hashes[#hashes + 1] = ARGV[i] end
local hits = {}
local function cached_blocks(member)
  if hits[member] then return hits[member] end
  local key = pfx_head .. string.match(member, '^([^|]+)')
  local lo, hi = 0, #hashes
  while lo < hi do
    local mid = math.floor((lo + hi + 1) / 2)
    if redis.call('SISMEMBER', key, hashes[mid]) == 1 then lo = mid else hi = mid - 1 end
  end
  hits[member] = lo
  return lo
end
local function overlap_bonus(role, member)
  if #hashes == 0 then return 0 end
  if role == 'p' and w_p > 0 then return w_p * cached_blocks(member) * block_size end
  if role == 'd' and w_d > 0 then return w_d * cached_blocks(member) / #hashes * unit end
  return 0
end
local sets = {p = KEYS[3], d = KEYS[4], m = KEYS[5]}
local best = {}

-- Park-Miller: products stay below 2^53, so Lua's doubles keep every bit.
local function next_rand()
  seed = (seed * 16807) % 2147483647
  return seed
end

while true do
  local members, scores, owner = {}, {}, {}
  for role in string.gmatch(roles, '%a') do
    local sample = redis.call('ZRANGE', sets[role], 0, k - 1, 'WITHSCORES')
    for i = 1, #sample, 2 do
      local n = #members + 1
      members[n], scores[n], owner[n] = sample[i], tonumber(sample[i + 1]) - overlap_bonus(role, sample[i]), role
    end
  end
  if #members == 0 then break end
  local leases = redis.call('ZMSCORE', alive, unpack(members))
  local dead = {}
  best = {}
  local ties = {}
  for i, member in ipairs(members) do
    local role, score = owner[i], scores[i]
    local lease = leases[i] and tonumber(leases[i])
    if not score then
      -- not a number (poison): never picked, never booked
    elseif lease and lease > now then
      local b = best[role]
      if not b or score < b[2] then
        best[role], ties[role] = {member, score}, 1
      elseif score == b[2] then
        ties[role] = ties[role] + 1
        if next_rand() % ties[role] == 0 then best[role] = {member, score} end
      end
    else
      dead[#dead + 1] = {role, member}
    end
  end
  if #dead == 0 then break end
  for _, d in ipairs(dead) do
    redis.call('ZREM', sets[d[1]], d[2])
    redis.call('ZREM', alive, d[2])
  end
  if best.m or (best.p and best.d) then break end
end

-- As in FastDeploy, mixed nodes compete with prefill nodes on queued prompt tokens; a mixed
-- winner serves the request alone.
local tail = '|' .. req_id .. '|' .. attempt .. '|'
if best.m and (not (best.p and best.d) or best.m[2] <= best.p[2]) then
  local m = best.m[1]
  redis.call('ZADD', bookings, expire_at, 'm|' .. group .. '|' .. m .. tail .. (prompt + 1))
  redis.call('ZADD', sets.m, 'XX', 'INCR', prompt + 1, m)
  return {'mixed', m, m}
end
-- Conditional disaggregation (#15), a section of its own: the decode node prefills locally when
-- the prompt is too short to be worth a hand-off, when even the least-loaded prefill queue is past
-- the limit, or (with that limit set) when no prefill node is live. Only D is booked.
if best.d then
  local why = nil
  if max_queue > 0 and not best.p then why = 'no_prefill'
  elseif best.p and max_queue > 0 and best.p[2] > max_queue then why = 'prefill_queue'
  elseif best.p and prompt < min_prefill then why = 'short_prompt' end
  if why then
    local d = best.d[1]
    redis.call('ZADD', bookings, expire_at, 'd|' .. group .. '|' .. d .. tail .. unit)
    redis.call('ZADD', sets.d, 'XX', 'INCR', unit, d)
    return {'local/' .. why, d, d}
  end
end
if not (best.p and best.d) then return {} end
local p, d = best.p[1], best.d[1]
-- KV-aware: P is booked for the tokens it will compute (its cached prefix is not work to queue).
local p_amount = prompt
if #hashes > 0 and w_p > 0 then p_amount = math.max(1, prompt - cached_blocks(p) * block_size) end
redis.call('ZADD', bookings, expire_at, 'p|' .. group .. '|' .. p .. tail .. p_amount,
  expire_at, 'd|' .. group .. '|' .. d .. tail .. unit)
redis.call('ZADD', sets.p, 'XX', 'INCR', p_amount, p)
redis.call('ZADD', sets.d, 'XX', 'INCR', unit, d)
if #hashes == 0 then return {'disagg', p, d} end
-- for the record (weights or not) and the booking members: P's and D's cached blocks, P's amount
return {'disagg', p, d, cached_blocks(p), cached_blocks(d), p_amount}
""",
)

RELEASE = LuaScript(
    "release",
    """
-- Release bookings (idempotent: only the call whose ZREM removes a member gives its load back).
-- KEYS[1] bookings ZSET  KEYS[1+i] the candidate ZSET that booking i was made on
-- ARGV[i] booking member i: kind|group|node|incarnation|req_id|attempt|amount
-- Returns the total amount released. ZADD XX never re-creates a member whose node was removed.
local released = 0
for i, member in ipairs(ARGV) do
  if redis.call('ZREM', KEYS[1], member) == 1 then
    local node, inc, amount = string.match(member, '^%a|[^|]+|([^|]+)|([^|]+)|[^|]+|[^|]+|(%d+)$')
    if node then
      redis.call('ZADD', KEYS[1 + i], 'XX', 'INCR', -tonumber(amount), node .. '|' .. inc)
      released = released + tonumber(amount)
    end
  end
end
return released
""",
)

HEARTBEAT = LuaScript(
    "heartbeat",
    """
-- A node's heartbeat: extend its lease (Redis server time), (re-)register when the lease entry is
-- missing (first start, Redis lost its data, a dispatcher removed it after a lapse), keep its
-- decode score's free-block part current, record the load report.
-- KEYS[1] nodes HASH  KEYS[2] alive ZSET  KEYS[3] its candidate ZSET  KEYS[4] its heartbeat HASH
-- KEYS[5] its work STREAM  KEYS[6] its control STREAM
-- ARGV[1] node id  ARGV[2] member (node|incarnation)  ARGV[3] msgpack NodeInfo  ARGV[4] lease ms
-- ARGV[5] TTL ms of the long-lived keys  ARGV[6] flags: 'r' refresh those TTLs now, 'l' the load
-- report changed, 't' read the server clock (TIME) instead of trusting ARGV[11], 'x' the node read
-- entries since the last trim (a steady, idle node's beat is a plain ZADD XX CH, not this script),
-- 'n' not a candidate (draining or switching): out of its candidate set, status written each beat
-- ARGV[11] the node's estimate of server time ms (its offset is re-measured with 't' every few beats)
-- ARGV[7] decode booking unit ('0' for prefill/mixed nodes)  ARGV[8] free KV blocks
-- ARGV[9] id of the last work entry read  ARGV[10] id of the last control entry read ('' = none):
-- older entries are trimmed here, once per beat, not per request
-- ARGV[12..] load report and status (state, state_reason, ...) as field, value pairs
-- Returns {registered (1/0), lease expiry ms, server now ms (0 when not measured)}.
local now, measured = tonumber(ARGV[11]), 0
if string.find(ARGV[6], 't', 1, true) then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  measured = now
end
local expiry = now + tonumber(ARGV[4])
local registered = redis.call('ZADD', KEYS[2], expiry, ARGV[2])
-- Our description was deleted (by hand, or repaired as poison): register again in full.
if registered == 0 and redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then registered = 1 end
local unit = tonumber(ARGV[7])
local refresh = registered == 1 or string.find(ARGV[6], 'r', 1, true) ~= nil
local leaving = string.find(ARGV[6], 'n', 1, true) ~= nil
local load_changed = registered == 1 or leaving or string.find(ARGV[6], 'l', 1, true) ~= nil
if registered == 1 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  if not leaving then redis.call('ZADD', KEYS[3], 'NX', 0, ARGV[2]) end
end
if leaving then redis.call('ZREM', KEYS[3], ARGV[2]) end
if redis.call('EXISTS', KEYS[5]) == 0 then
  -- An empty stream (MAXLEN 0 trims the creating entry) so frontends may XADD NOMKSTREAM; also
  -- after someone deleted it (the steady beat checks it exists).
  redis.call('XADD', KEYS[5], 'MAXLEN', '0', '*', 'created', now)
  redis.call('PEXPIRE', KEYS[5], ARGV[5])
end
if unit > 0 and load_changed then
  local score = tonumber(redis.call('ZSCORE', KEYS[3], ARGV[2]) or '0')
  local booked = math.floor(score / unit)
  local free = math.min(math.max(tonumber(ARGV[8]), 0), unit - 1)
  redis.call('ZADD', KEYS[3], 'XX', booked * unit + (unit - 1 - free), ARGV[2])
end
if load_changed then
  redis.call('HSET', KEYS[4], 'incarnation', string.match(ARGV[2], '|(.*)$'), 'ts_ms', now, unpack(ARGV, 12))
end
if ARGV[9] ~= '' and registered == 0 then redis.call('XTRIM', KEYS[5], 'MINID', ARGV[9]) end
if ARGV[10] ~= '' and redis.call('EXISTS', KEYS[6]) == 1 then redis.call('XTRIM', KEYS[6], 'MINID', ARGV[10]) end
if refresh then
  for i = 1, 6 do
    if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('PEXPIRE', KEYS[i], ARGV[5]) end
  end
end
return {registered, expiry, measured}
""",
)

FRONTEND_BEAT = LuaScript(
    "frontend_beat",
    """
-- A frontend's heartbeat: extend its lease, make sure its results stream and the bookings ZSET
-- exist (writers never create them: XADD NOMKSTREAM / ZADD on an existing key), read server time.
-- KEYS[1] frontends ZSET  KEYS[2] its results STREAM  KEYS[3] bookings ZSET  KEYS[4] epoch STRING
-- KEYS[5] request log STREAM
-- ARGV[1] frontend id  ARGV[2] lease ms  ARGV[3] TTL ms  ARGV[4] candidate epoch value
-- ARGV[5] id of the last results entry read ('' = none): older entries are trimmed
-- Returns {now ms, epoch value}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
for _, stream in ipairs({KEYS[2], KEYS[5]}) do
  if redis.call('EXISTS', stream) == 0 then
    redis.call('XADD', stream, 'MAXLEN', '0', '*', 'created', now)
  end
  redis.call('PEXPIRE', stream, ARGV[3])
end
if ARGV[5] ~= '' then redis.call('XTRIM', KEYS[2], 'MINID', ARGV[5]) end
-- '~' scored +inf is never swept: it keeps the ZSET in existence (and its TTL) while frontends live.
redis.call('ZADD', KEYS[3], '+inf', '~')
redis.call('PEXPIRE', KEYS[3], ARGV[3])
redis.call('SET', KEYS[4], ARGV[4], 'NX')
redis.call('PEXPIRE', KEYS[4], ARGV[3])
return {now, redis.call('GET', KEYS[4])}
""",
)

DEREGISTER = LuaScript(
    "deregister",
    """
-- Graceful node exit: end the lease now instead of waiting for it to lapse.
-- KEYS[1] nodes HASH  KEYS[2] alive ZSET  KEYS[3] its candidate ZSET  KEYS[4] its heartbeat HASH
-- ARGV[1] node id  ARGV[2] member (node|incarnation)  ARGV[3] incarnation
-- Returns 1 when the registration was removed, 0 when another incarnation owns the id.
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('ZREM', KEYS[3], ARGV[2])
if redis.call('HGET', KEYS[4], 'incarnation') ~= ARGV[3] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[4])
return 1
""",
)
