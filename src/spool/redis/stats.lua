#!lua
-- One account's state. KEYS: queue, waiting bytes, dead-letter stream, dead bytes, evicted counter.
-- ARGV: group, consumer. Answers {length, bytes, dead letters, dead bytes, evicted,
-- held unacknowledged by this consumer, held by all consumers, the oldest entry's record or ""}.
local q, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local mine, all = 0, 0
local ok, pending = pcall(redis.call, 'XPENDING', q, group)
if ok and pending then
  all = pending[1]
  if pending[4] then
    for _, c in ipairs(pending[4]) do
      if c[1] == consumer then mine = tonumber(c[2]) end
    end
  end
end
local oldest = ''
local first = redis.call('XRANGE', q, '-', '+', 'COUNT', 1)
if first[1] then oldest = first[1][2][2] end
return {redis.call('XLEN', q), tonumber(redis.call('GET', KEYS[2]) or '0'), redis.call('XLEN', KEYS[3]),
        tonumber(redis.call('GET', KEYS[4]) or '0'), tonumber(redis.call('GET', KEYS[5]) or '0'),
        mine, all, oldest}
