-- The guard's admission, then register.lua: a REGISTER whose digest the node verified without
-- I/O (its account cached) costs one round trip. This text is prepended to register.lua
-- (location.py: ADMITTED_REGISTER_SCRIPT); the guard's keys are sipfarm/protect/guard.py's.
--
-- KEYS     register.lua's, then the source's ban key and the nonce-use key
--          (sipfarm:protect:ban:{<ip>}, sipfarm:protect:nonce:<nonce>:<nc>): three slots, so
--          one Redis or a Sentinel-watched master only, never a Redis Cluster
-- ARGV     register.lua's, then the nonce use's expiry in milliseconds
--
-- First exactly what the guard's admit does (protect/redis_guard.py): PTTL of the ban, and
-- SET NX PX of the nonce use whatever the ban (a banned source's nonce use is spent too).
-- Then no binding is written unless the source is not banned AND the nonce use is new:
-- returns {3, ban PTTL (-2 none, -1 no end), 1 if the nonce use was new else 0} when refused,
-- else register.lua's reply (status 0, 1 or 2, then bindings).

local ban = redis.call('PTTL', KEYS[#KEYS - 1])
local first_use = redis.call('SET', KEYS[#KEYS], '1', 'NX', 'PX', ARGV[#ARGV])
if ban ~= -2 or not first_use then
  return {3, ban, first_use and 1 or 0}
end
-- register.lua reads KEYS[1..3] and counts them: it sees its own keys only. (ARGV needs no
-- such care: register.lua reads fixed positions, never past its own.)
local KEYS = {unpack(KEYS, 1, #KEYS - 2)}

