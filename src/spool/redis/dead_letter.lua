#!lua
-- Moves entries of one account to its dead letters, keeping at most max of them (oldest evicted).
-- KEYS: queue, waiting bytes, dead-letter stream, dead bytes, evicted counter.
-- ARGV: group, max, reason, message, dead_lettered_at_ms, the account's slot (0-1023), then the stream ids.
-- A letter's id is chosen here, not by Redis: its sequence number ends in the account's slot, so that
-- letters of different accounts never share an id (the list of every account's letters pages by id).
-- Answers {length, bytes, dead letters, dead bytes, evicted}.
local q, bytes, dead, dead_bytes, evicted = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local group, max, slot = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[6])
local last_ms, last_seq = 0, -1
local ok, info = pcall(redis.call, 'XINFO', 'STREAM', dead)
if ok then
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then
      local a, b = string.match(info[i + 1], '(%d+)-(%d+)')
      last_ms, last_seq = tonumber(a), tonumber(b)
    end
  end
end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- Above every id the stream gave (deleted ones too), ending in this account's slot.
local function next_id()
  if now_ms > last_ms then
    last_ms, last_seq = now_ms, slot
  else
    local k = math.floor(last_seq / 1024) + 1
    if k >= 1024 then
      last_ms, last_seq = last_ms + 1, slot
    else
      last_seq = k * 1024 + slot
    end
  end
  return string.format('%d-%d', last_ms, last_seq)
end
for i = 7, #ARGV do
  local e = redis.call('XRANGE', q, ARGV[i], ARGV[i])
  -- Only an entry still pending in the group (as for an ack: a replica that took it over may have
  -- moved it already).
  if e[1] and redis.call('XACK', q, group, ARGV[i]) == 1 then
    local record = e[1][2][2]
    redis.call('XADD', dead, next_id(), 'r', record, 'reason', ARGV[3], 'message', ARGV[4], 'at', ARGV[5], 'from', ARGV[i])
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
