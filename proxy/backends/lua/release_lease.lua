-- Give a fetch lease back if it is still ours, leaving (or clearing) the failure note.
-- KEYS: the lease, the failure note. ARGV: token, failure (or ''), the note's lifetime in ms.
if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('del', KEYS[1])
if ARGV[2] ~= '' then
  redis.call('set', KEYS[2], ARGV[2], 'PX', ARGV[3])
else
  redis.call('del', KEYS[2])
end
return 1
