-- Extend a fetch lease while its holder still works on it (queued for a budget slot, or
-- waiting for TeamUp), so the lease itself can stay short: a crashed holder's lease then ends
-- soon. KEYS: the lease. ARGV: token, the new lifetime in ms.
if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('pexpire', KEYS[1], ARGV[2])
return 1
