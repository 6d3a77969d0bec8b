#!lua flags=no-writes
-- One account's state. KEYS: queue, waiting bytes, surplus counter, dead-letter stream, dead bytes,
-- evicted counter, done hash. ARGV: group. Answers {records, bytes, dead letters, dead bytes, evicted,
-- packs held unacknowledged by all consumers, the oldest waiting record or "", entries}.
local q, group = KEYS[1], ARGV[1]
local held = 0
local ok, pending = pcall(redis.call, 'XPENDING', q, group)
if ok and pending then held = pending[1] end
local oldest = ''
local first = redis.call('XRANGE', q, '-', '+', 'COUNT', 1)
if first[1] then
  -- The first record of the first pack not yet acked or dead-lettered (a pack may be partly done).
  local records = records_of(first[1][2])
  local gone = set_of(redis.call('HGET', KEYS[7], first[1][1]) or nil)
  for k = 0, #records - 1 do
    if not gone[k] then oldest = records[k + 1] break end
  end
end
return {records_waiting(q, KEYS[3]), tonumber(redis.call('GET', KEYS[2]) or '0'), redis.call('XLEN', KEYS[4]),
        tonumber(redis.call('GET', KEYS[5]) or '0'), tonumber(redis.call('GET', KEYS[6]) or '0'),
        held, oldest, redis.call('XLEN', q)}
