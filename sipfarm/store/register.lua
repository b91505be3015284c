-- Apply one REGISTER to an AOR's bindings, atomically: RFC 3261 10.3 steps 6-8.
--
-- KEYS[1]  sipfarm:loc:{aor}       hash: binding key -> binding (JSON array, see location.py)
-- KEYS[2]  sipfarm:loc:aors        (optional) zset: aor -> latest expires_at     } for count_all;
-- KEYS[3]  sipfarm:loc:bindings    (optional) zset: aor\nkey -> expires_at       } absent on Cluster
-- ARGV     aor, now, call_id, cseq, max_contacts, remove_all ('1'/'0'), n,
--          then n triples: binding key, expires_at, binding JSON ('' = remove)
--
-- Returns {status, binding JSON...}: status 0 = applied (the bindings are the AOR's live ones
-- after the request), 1 = out of order, 2 = too many contacts (nothing applied; the bindings
-- are the live ones before the request). Expired bindings are purged in every case.
--
-- Binding JSON positions read here: [2] expires_at, [4] call_id, [5] cseq.

local loc = KEYS[1]
local indexed = #KEYS == 3
local aor = ARGV[1]
local now = tonumber(ARGV[2])
local call_id = ARGV[3]
local cseq = tonumber(ARGV[4])
local max_contacts = tonumber(ARGV[5])
local remove_all = ARGV[6] == '1'
local n = tonumber(ARGV[7])

local OK, OUT_OF_ORDER, TOO_MANY = 0, 1, 2

-- Live bindings: key -> {json, expires_at, call_id, cseq}; expired ones are collected to purge.
local live = {}
local dead = {}
local flat = redis.call('HGETALL', loc)
for i = 1, #flat, 2 do
  local b = cjson.decode(flat[i + 1])
  if b[2] <= now then
    dead[#dead + 1] = flat[i]
  else
    live[flat[i]] = {flat[i + 1], b[2], b[4], b[5]}
  end
end

local function purge(keys)
  if #keys == 0 then return end
  redis.call('HDEL', loc, unpack(keys))
  if indexed then
    for i = 1, #keys do keys[i] = aor .. '\n' .. keys[i] end
    redis.call('ZREM', KEYS[3], unpack(keys))
  end
end

local function fail(status)
  purge(dead)
  local out = {status}
  for _, b in pairs(live) do out[#out + 1] = b[1] end
  return out
end

-- RFC 3261 10.3 steps 6/7: same Call-ID with a CSeq not higher than the stored one aborts
-- the whole request (an old REGISTER overtaken by a newer one, or a replay).
local function stale(old)
  return old[3] == call_id and cseq <= old[4]
end

-- The AOR's bindings after the request: key -> {json, expires_at}.
local final = {}
for k, b in pairs(live) do final[k] = {b[1], b[2]} end
local written = {}  -- keys whose value this request sets
if remove_all then
  -- Step 6, "Contact: *" with Expires 0: every binding goes, unless one is newer.
  for k, old in pairs(live) do
    if stale(old) then return fail(OUT_OF_ORDER) end
  end
  final = {}
else
  -- Step 7; a key given twice in one request keeps its last contact.
  local added = false
  for i = 0, n - 1 do
    local k = ARGV[8 + 3 * i]
    local json = ARGV[10 + 3 * i]
    local old = live[k]
    if old ~= nil and stale(old) then return fail(OUT_OF_ORDER) end
    if json == '' then
      final[k] = nil
      written[k] = nil
    else
      if old == nil then added = true end
      final[k] = {json, tonumber(ARGV[9 + 3 * i])}
      written[k] = true
    end
  end
  -- Only a request that adds a binding is refused: refreshes and removals always pass,
  -- even when max_contacts was lowered below what the AOR already has.
  if added then
    local count = 0
    for _ in pairs(final) do count = count + 1 end
    if count > max_contacts then return fail(TOO_MANY) end
  end
end

-- Step 8: commit, and answer with every live binding.
for k in pairs(live) do
  if final[k] == nil then dead[#dead + 1] = k end
end
purge(dead)

local out = {OK}
local hset = {}
local latest = nil
for k, b in pairs(final) do
  out[#out + 1] = b[1]
  if latest == nil or b[2] > latest then latest = b[2] end
  if written[k] then
    hset[#hset + 1] = k
    hset[#hset + 1] = b[1]
    if indexed then redis.call('ZADD', KEYS[3], b[2], aor .. '\n' .. k) end
  end
end
if #hset > 0 then redis.call('HSET', loc, unpack(hset)) end

if latest == nil then
  redis.call('DEL', loc)
  if indexed then redis.call('ZREM', KEYS[2], aor) end
else
  -- Relative TTL, so Redis drops the AOR when its last binding expires by Redis's own clock
  -- (the caller's `now` may be another node's, or a test's).
  redis.call('PEXPIRE', loc, math.ceil((latest - now) * 1000))
  if indexed then redis.call('ZADD', KEYS[2], latest, aor) end
end
return out
