#!lua
-- What this replica may deliver of one account: entries other replicas left idle longer than
-- claim_idle (taken over), its own unacknowledged entries after a cursor, then new entries.
-- KEYS[1]: the queue stream. ARGV: group, consumer, after (a stream id), max, claim_idle (ms; 0: do
-- not look for idle entries this time).
-- Answers a flat list {id, record, id, record, ...}; entries deleted meanwhile are acked and skipped.
local q, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local after, max, idle = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
pcall(redis.call, 'XGROUP', 'CREATE', q, group, '0', 'MKSTREAM')
local out, seen = {}, {}
local function add(entries)
  for _, e in ipairs(entries) do
    local id, fields = e[1], e[2]
    if not seen[id] then
      seen[id] = true
      if fields and fields[2] then
        out[#out + 1] = id
        out[#out + 1] = fields[2]
      else
        redis.call('XACK', q, group, id)
      end
    end
  end
end
-- idle 0: the caller looked for idle entries a moment ago (it does so about once a second).
if idle > 0 then
  local claimed = redis.call('XAUTOCLAIM', q, group, consumer, idle, '0-0', 'COUNT', max)
  add(claimed[2])
end
local own = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', max, 'STREAMS', q, after)
if own and own[1] then add(own[1][2]) end
local room = max - #out / 2
if room > 0 then
  local new = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', room, 'STREAMS', q, '>')
  if new and new[1] then add(new[1][2]) end
end
return out
