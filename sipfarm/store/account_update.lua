-- Overwrite fields of an existing account only (set_password, set_enabled).
-- KEYS[1] = sipfarm:acct:{user@domain}; ARGV = field, value, ...
-- Returns 1 if updated, 0 if there is no such account (nothing written).
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
