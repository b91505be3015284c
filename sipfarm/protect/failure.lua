-- Count one failed authentication, atomically; ban the source at the threshold.
-- (sipfarm/protect/guard.py has the theory; memory_guard.py states the same steps in Python.)
--
-- KEYS[1]  sipfarm:protect:fail:src:<ip>       counter of the source's failures
-- KEYS[2]  sipfarm:protect:fail:acct:<aor>     counter of the account's failures
-- KEYS[3]  sipfarm:protect:ban:<ip>            the source's ban
-- KEYS[4]  sipfarm:protect:bans                 index of bans: source -> end (unix ms)
-- ARGV     window_ms, max_failures, ban_ms, source
--
-- Returns {source failures, account failures, 1 if this failure started the ban else 0,
-- PTTL of the ban (-2 none, -1 no end)}. A counter's window opens with its first failure. A
-- ban consumes the failures that caused it: the source's counter is cleared when it starts.

local window_ms = ARGV[1]
local source = redis.call('INCR', KEYS[1])
if source == 1 then
    redis.call('PEXPIRE', KEYS[1], window_ms)
end
local account = redis.call('INCR', KEYS[2])
if account == 1 then
    redis.call('PEXPIRE', KEYS[2], window_ms)
end
local started = 0
if source >= tonumber(ARGV[2]) and redis.call('SET', KEYS[3], source, 'NX', 'PX', ARGV[3]) then
    started = 1
    redis.call('DEL', KEYS[1])
    local t = redis.call('TIME')
    redis.call('ZADD', KEYS[4], t[1] * 1000 + math.floor(t[2] / 1000) + tonumber(ARGV[3]), ARGV[4])
end
return {source, account, started, redis.call('PTTL', KEYS[3])}
