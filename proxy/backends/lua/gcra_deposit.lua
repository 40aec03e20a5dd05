-- Add backlog to one GCRA key: what in-process fallbacks admitted while Redis was out of reach
-- (see FallbackLimiter). Times in ms. ARGV: deposit. The tat becomes max(tat, now) + deposit.
local deposit = tonumber(ARGV[1])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + tonumber(time[2]) / 1000
local tat = tonumber(string.match(redis.call('GET', KEYS[1]) or '', '^%S+')) or now
if tat < now then
  tat = now
end
tat = tat + deposit
redis.call('SET', KEYS[1], string.format('%.17g', tat), 'PX', math.max(1, math.ceil(tat - now)))
return 1
