-- Give an unsent write's Idempotency-Key back, if its in-flight mark is still ours.
-- KEYS: the key's record. ARGV: our in-flight record.
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
