#!lua
-- Removes delivered entries of one account. KEYS[1]: queue, KEYS[2]: waiting-bytes counter.
-- ARGV[1]: group; ARGV[2..]: stream ids. Ids not in the queue are ignored. Answers {length, bytes}.
local q, bytes, group = KEYS[1], KEYS[2], ARGV[1]
for i = 2, #ARGV do
  local e = redis.call('XRANGE', q, ARGV[i], ARGV[i])
  if e[1] then
    redis.call('XACK', q, group, ARGV[i])
    redis.call('XDEL', q, ARGV[i])
    redis.call('DECRBY', bytes, #e[1][2][2])
  end
end
return {redis.call('XLEN', q), tonumber(redis.call('GET', bytes) or '0')}
