-- Reserve up to `want` units of one GCRA key; the same maths as gcra_reserve in
-- proxy/core/gcra.py. Times in ms. The value is "<tat> <horizon>" (gcra.lua reads the tat
-- and writes the tat alone, which only makes the next deposit whole again).
-- ARGV: period, limit, want, epsilon, lifetime, hold_all (1: no unit spent now).
-- Returns {granted, remaining, reset_ms, retry_ms}, the floats as strings, since Redis
-- truncates Lua numbers to integers.
local period = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local eps = tonumber(ARGV[4])
local lifetime = tonumber(ARGV[5])
local hold_all = ARGV[6] == '1'
local interval = period / limit
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + tonumber(time[2]) / 1000
local tat, horizon = now, now
local raw = redis.call('GET', KEYS[1])
if raw then
  local a, b = string.match(raw, '^(%S+)%s*(%S*)$')
  tat = tonumber(a) or now
  horizon = tonumber(b) or now
end
local level = math.max(tat - now, 0)
local covered = math.max(horizon - now, 0)
local granted = 0
if want >= 2 then
  local spent_now = interval
  if hold_all then
    spent_now = 0
  end
  local deposit = math.max(0, lifetime - spent_now - covered)
  local fits = math.floor((period + eps - level - deposit) / interval)
  if fits >= 2 then
    granted = math.min(want, fits)
    level = level + granted * interval + deposit
    covered = math.max(covered, lifetime)
  end
end
if granted == 0 and not hold_all and level + interval <= period + eps then
  granted = 1
  level = level + interval
end
local retry = 0
if granted == 0 then
  retry = level + interval - period
end
if granted > 0 then
  local ttl = math.max(1, math.ceil(level - eps))
  local value = string.format('%.17g %.17g', now + level, now + math.min(covered, level))
  redis.call('SET', KEYS[1], value, 'PX', ttl)
end
local remaining = math.max(0, math.floor((period - level + eps) / interval))
return {granted, remaining, string.format('%.17g', level), string.format('%.17g', retry)}
