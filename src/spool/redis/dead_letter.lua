#!lua
-- Moves entries of one account to its dead letters, keeping at most max of them (oldest evicted).
-- KEYS: queue, waiting bytes, dead-letter stream, dead bytes, evicted counter.
-- ARGV: group, max, reason, message, dead_lettered_at_ms, then the stream ids.
-- Answers {length, bytes, dead letters, dead bytes, evicted}.
local q, bytes, dead, dead_bytes, evicted = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local group, max = ARGV[1], tonumber(ARGV[2])
for i = 6, #ARGV do
  local e = redis.call('XRANGE', q, ARGV[i], ARGV[i])
  -- Only an entry still pending in the group (as for an ack: a replica that took it over may have
  -- moved it already).
  if e[1] and redis.call('XACK', q, group, ARGV[i]) == 1 then
    local record = e[1][2][2]
    redis.call('XADD', dead, '*', 'r', record, 'reason', ARGV[3], 'message', ARGV[4], 'at', ARGV[5], 'from', ARGV[i])
    redis.call('INCRBY', dead_bytes, #record)
    redis.call('XDEL', q, ARGV[i])
    redis.call('DECRBY', bytes, #record)
  end
end
local over = redis.call('XLEN', dead) - max
if over > 0 then
  for _, e in ipairs(redis.call('XRANGE', dead, '-', '+', 'COUNT', over)) do
    redis.call('XDEL', dead, e[1])
    redis.call('DECRBY', dead_bytes, #e[2][2])
    redis.call('INCR', evicted)
  end
end
return {redis.call('XLEN', q), tonumber(redis.call('GET', bytes) or '0'), redis.call('XLEN', dead),
        tonumber(redis.call('GET', dead_bytes) or '0'), tonumber(redis.call('GET', evicted) or '0')}
