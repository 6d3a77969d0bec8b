#!lua
-- Moves records of one account to its dead letters, keeping at most max of them (oldest evicted).
-- KEYS: queue, waiting bytes, surplus counter, done hash, dead-letter stream, dead bytes, evicted counter.
-- ARGV: group, consumer, max, reason, message, dead_lettered_at_ms, the account's slot (0-1023), then
-- per pack: its stream id and the indices ("*" or "0,3").
-- A letter's id is chosen here, not by Redis: its sequence number ends in the account's slot, so that
-- letters of different accounts never share an id (the list of every account's letters pages by id).
-- Answers {records, bytes, dead letters, dead bytes, evicted, entries}.
local q, bytes, surplus, done, dead, dead_bytes, evicted = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local group, consumer, max, slot = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[7])
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
local freed, freed_bytes, left = 0, 0, 0
for i = 8, #ARGV, 2 do
  local id = ARGV[i]
  -- Only a pack still pending in the group (as for an ack: a replica that took it over may have
  -- moved its records already).
  local e = redis.call('XRANGE', q, id, id)
  local pending = #redis.call('XCLAIM', q, group, consumer, 0, id, 'JUSTID') > 0
  if e[1] and pending then
    local records = records_of(e[1][2])
    local prior = redis.call('HGET', done, id)
    local new, set, n = newly_done(records, prior, ARGV[i + 1])
    for _, k in ipairs(new) do
      local record = records[k + 1]
      redis.call('XADD', dead, next_id(), 'r', record, 'reason', ARGV[4], 'message', ARGV[5], 'at', ARGV[6], 'from', id .. '/' .. k)
      redis.call('INCRBY', dead_bytes, #record)
      freed, freed_bytes = freed + 1, freed_bytes + #record
    end
    if n >= #records then
      redis.call('XACK', q, group, id)
      redis.call('XDEL', q, id)
      left = left + 1
      if prior then redis.call('HDEL', done, id) end
    else
      redis.call('HSET', done, id, list_of(set))
    end
  elseif pending then
    redis.call('XACK', q, group, id)
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
add_surplus(surplus, left - freed)
return {records_waiting(q, surplus), redis.call('DECRBY', bytes, freed_bytes), redis.call('XLEN', dead),
        tonumber(redis.call('GET', dead_bytes) or '0'), tonumber(redis.call('GET', evicted) or '0'), redis.call('XLEN', q)}
