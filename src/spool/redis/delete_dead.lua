#!lua
-- Deletes dead letters of one account. KEYS: dead-letter stream, dead bytes. ARGV: ids.
-- Answers {deleted, dead letters, dead bytes}.
local dead, dead_bytes = KEYS[1], KEYS[2]
local n = 0
for i = 1, #ARGV do
  local e = redis.call('XRANGE', dead, ARGV[i], ARGV[i])
  if e[1] then
    redis.call('XDEL', dead, ARGV[i])
    redis.call('DECRBY', dead_bytes, #e[1][2][2])
    n = n + 1
  end
end
return {n, redis.call('XLEN', dead), tonumber(redis.call('GET', dead_bytes) or '0')}
