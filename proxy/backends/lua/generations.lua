-- Add to collection generations and read them all, atomically (one key: one Cluster slot).
-- KEYS: the generation hash. ARGV: name, count, name, count, ... (none: just read).
-- Returns the whole hash as HGETALL does.
for i = 1, #ARGV, 2 do
  redis.call('hincrby', KEYS[1], ARGV[i], ARGV[i + 1])
end
return redis.call('hgetall', KEYS[1])
