#!lua
-- Removes delivered entries of one account. KEYS[1]: queue, KEYS[2]: waiting-bytes counter.
-- ARGV[1]: group, ARGV[2]: consumer; then pairs of (stream id, its record's size, or -1 when the caller
-- does not know it). An entry counts as removed here only if it was still pending in the group, so that
-- two replicas acking the same entry (one took it over) subtract its bytes once: XCLAIM with no minimum
-- idle time answers exactly the given ids that are pending (claiming them for this consumer, which acks
-- them at once). Three commands per call, whatever its size. Ids not waiting are ignored.
-- Answers {length, bytes}.
local q, bytes, group, consumer = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
local size, claim = {}, {'XCLAIM', q, group, consumer, 0}
for i = 3, #ARGV, 2 do
  size[ARGV[i]] = tonumber(ARGV[i + 1])
  claim[#claim + 1] = ARGV[i]
end
claim[#claim + 1] = 'JUSTID'
local pending = redis.call(unpack(claim))
local freed = 0
if #pending > 0 then
  for _, id in ipairs(pending) do
    local s = size[id] or -1
    if s < 0 then
      local e = redis.call('XRANGE', q, id, id)
      s = e[1] and #e[1][2][2] or 0
    end
    freed = freed + s
  end
  redis.call('XACK', q, group, unpack(pending))
  redis.call('XDEL', q, unpack(pending))
end
return {redis.call('XLEN', q), redis.call('DECRBY', bytes, freed)}
