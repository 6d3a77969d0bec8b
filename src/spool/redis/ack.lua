#!lua
-- Removes delivered entries of one account. KEYS[1]: queue, KEYS[2]: waiting-bytes counter.
-- ARGV[1]: group; then pairs of (stream id, its record's size, or -1 when the caller does not know it).
-- An entry counts as removed here only if it was still pending in the group (XACK says 1), so that two
-- replicas acking the same entry (one took it over) subtract its bytes once. Ids not waiting are ignored.
-- Answers {length, bytes}.
local q, bytes, group = KEYS[1], KEYS[2], ARGV[1]
local freed, gone = 0, {}
for i = 2, #ARGV, 2 do
  local id, size = ARGV[i], tonumber(ARGV[i + 1])
  if size < 0 then
    local e = redis.call('XRANGE', q, id, id)
    size = e[1] and #e[1][2][2] or 0
  end
  if redis.call('XACK', q, group, id) == 1 then
    freed = freed + size
    gone[#gone + 1] = id
  end
end
if #gone > 0 then redis.call('XDEL', q, unpack(gone)) end
return {redis.call('XLEN', q), redis.call('DECRBY', bytes, freed)}
