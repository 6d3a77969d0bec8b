#!lua
-- Moves dead letters of one account back to its queue, each as the record given (mapped again), one
-- pack each. KEYS: queue, waiting bytes, surplus counter, dead-letter stream, dead bytes.
-- ARGV: pairs of (dead-letter id, record). Letters no longer there are skipped.
-- Answers {moved, records, bytes, dead letters, dead bytes, entries}.
local q, bytes, surplus, dead, dead_bytes = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local moved = 0
for i = 1, #ARGV, 2 do
  local e = redis.call('XRANGE', dead, ARGV[i], ARGV[i])
  if e[1] then
    redis.call('XDEL', dead, ARGV[i])
    redis.call('DECRBY', dead_bytes, #e[1][2][2])
    add_records(q, {ARGV[i + 1]})
    redis.call('INCRBY', bytes, #ARGV[i + 1])
    moved = moved + 1
  end
end
return {moved, records_waiting(q, surplus), tonumber(redis.call('GET', bytes) or '0'), redis.call('XLEN', dead),
        tonumber(redis.call('GET', dead_bytes) or '0'), redis.call('XLEN', q)}
