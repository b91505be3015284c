-- Remove bindings of one AOR outside a REGISTER (administrative unregister, dead flow).
-- KEYS as register.lua. ARGV: aor, contact URI ('' = every binding of the AOR).
-- Returns the number of bindings removed.
local loc = KEYS[1]
local indexed = #KEYS == 3
local aor = ARGV[1]
local contact = ARGV[2]

local flat = redis.call('HGETALL', loc)
local gone = {}
for i = 1, #flat, 2 do
  if contact == '' or cjson.decode(flat[i + 1])[1] == contact then
    gone[#gone + 1] = flat[i]
  end
end
if #gone == 0 then return 0 end
redis.call('HDEL', loc, unpack(gone))
if indexed then
  local members = {}
  for i = 1, #gone do members[i] = aor .. '\n' .. gone[i] end
  redis.call('ZREM', KEYS[3], unpack(members))
  if redis.call('EXISTS', loc) == 0 then redis.call('ZREM', KEYS[2], aor) end
end
return #gone
