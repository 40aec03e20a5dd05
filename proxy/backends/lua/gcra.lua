-- GCRA on one key; the same maths as proxy/core/gcra.py. Times in ms.
-- ARGV: period, limit, cost, epsilon[, floor]. floor (ms, optional): the backlog is at least
-- that much, and the raised tat is kept (the first call after a Redis outage withholds the
-- burst that in-process fallbacks may have spent meanwhile).
-- Returns {allowed, remaining, reset_ms, retry_ms}, the floats as strings, since Redis
-- truncates Lua numbers to integers.
local period = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local eps = tonumber(ARGV[4])
local interval = period / limit
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + tonumber(time[2]) / 1000
-- The value may carry gcra_reserve.lua's horizon after the tat; only the tat counts here.
local tat = tonumber(string.match(redis.call('GET', KEYS[1]) or '', '^%S+'))
local floor = tonumber(ARGV[5] or '0') or 0
if floor > 0 and (not tat or tat < now + floor) then
  tat = now + floor
  redis.call('SET', KEYS[1], string.format('%.17g', tat), 'PX', math.max(1, math.ceil(floor)))
end
local level = 0
if tat and tat > now then
  level = tat - now
end
local wanted = level + cost * interval
local allowed = cost <= limit and wanted <= period + eps
local retry = 0
if allowed then
  level = wanted
  if cost > 0 then
    local ttl = math.max(1, math.ceil(level - eps))
    redis.call('SET', KEYS[1], string.format('%.17g', now + level), 'PX', ttl)
  end
else
  retry = wanted - period
end
local remaining = math.max(0, math.floor((period - level + eps) / interval))
return {allowed and 1 or 0, remaining, string.format('%.17g', level),
        string.format('%.17g', retry)}
