-- Claim an Idempotency-Key for a write about to be sent, or say what holds it already.
-- KEYS: the key's record. ARGV: the in-flight record, its lifetime in ms.
-- Returns {1} when claimed, else {0, record} (the in-flight mark or the stored answer).
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {1} end
local found = redis.call('get', KEYS[1])
if not found then
  redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {1}
end
return {0, found}
