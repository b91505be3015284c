-- Count one failed authentication of a source, atomically; ban the source at the threshold.
-- (sipfarm/protect/guard.py has the theory; memory_guard.py states the same steps in Python.)
--
-- KEYS[1]  sipfarm:protect:fail:src:{<ip>}     counter of the source's failures
-- KEYS[2]  sipfarm:protect:ban:{<ip>}          the source's ban (same hash slot: one Cluster slot)
-- KEYS[3]  sipfarm:protect:working:{<ip>}:<account>  set while the failed account authenticates
--          from the source (its phone works; for a user name no account has, a key never set)
-- ARGV     window_ms, max_failures, ban_ms, max_failures_working (the threshold while KEYS[3] is)
--
-- Returns {source failures, 1 if this failure started the ban else 0, PTTL of the ban (-2 none,
-- -1 no end)}. A counter's window opens with its first failure. A ban consumes the failures
-- that caused it: the source's counter is cleared when it starts. The account's counter and
-- the ban index are other slots: redis_guard.py writes them with commands of their own.

local source = redis.call('INCR', KEYS[1])
if source == 1 then
    redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
local limit = tonumber(ARGV[2])
if redis.call('EXISTS', KEYS[3]) == 1 then
    limit = tonumber(ARGV[4])
end
local started = 0
if source >= limit and redis.call('SET', KEYS[2], source, 'NX', 'PX', ARGV[3]) then
    started = 1
    redis.call('DEL', KEYS[1])
end
return {source, started, redis.call('PTTL', KEYS[2])}
