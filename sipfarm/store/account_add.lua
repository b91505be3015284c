-- Create an account hash only if it does not exist (AccountStore.add).
-- KEYS[1] = sipfarm:acct:{user@domain}; ARGV = field, value, field, value, ...
-- Returns 1 if created, 0 if the account already existed (nothing written).
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
