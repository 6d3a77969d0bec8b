#!lua
-- Removes delivered records of one account. KEYS: queue, waiting-bytes counter, surplus counter,
-- done hash. ARGV[1]: group, ARGV[2]: consumer; then per pack: its stream id, its record count (-1: not
-- known), the indices delivered ("*": all of them, or "0,3"), their total size (-1: not known).
-- Only packs still pending in the group count, so that two replicas acking the same records (one took
-- the pack over) subtract them once: XCLAIM with no minimum idle time answers exactly the given ids
-- that are pending (claiming them for this consumer). A pack leaves (XACK, XDEL) once all its records
-- are done; until then its done indices are kept. Acking whole packs of known size is three commands
-- whatever their number (four when some pack of the account is partly done). Answers {records, bytes, entries}.
local q, bytes, surplus, done = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local group, consumer = ARGV[1], ARGV[2]
local given, claim = {}, {'XCLAIM', q, group, consumer, 0}
for i = 3, #ARGV, 4 do
  given[ARGV[i]] = {tonumber(ARGV[i + 1]), ARGV[i + 2], tonumber(ARGV[i + 3])}
  claim[#claim + 1] = ARGV[i]
end
claim[#claim + 1] = 'JUSTID'
local pending = redis.call(unpack(claim))
-- `left`: packs that were there and leave (each took one of the freed records off the entry count).
local freed, freed_bytes, leaving, forget, left = 0, 0, {}, {}, 0
-- Packs partly done are few (a batch boundary, a bisection): one read answers for all.
local priors = {}
if #pending > 0 and redis.call('HLEN', done) > 0 then priors = redis.call('HMGET', done, unpack(pending)) end
for k, id in ipairs(pending) do
  local g = given[id]
  local prior = priors[k]
  if not prior and g[2] == '*' and g[1] >= 0 and g[3] >= 0 then
    freed, freed_bytes = freed + g[1], freed_bytes + g[3]
    leaving[#leaving + 1] = id
    left = left + 1
  else
    local e = redis.call('XRANGE', q, id, id)
    if e[1] then
      local records = records_of(e[1][2])
      local new, set, n = newly_done(records, prior, g[2])
      for _, i in ipairs(new) do
        freed, freed_bytes = freed + 1, freed_bytes + #records[i + 1]
      end
      if n >= #records then
        leaving[#leaving + 1] = id
        left = left + 1
        if prior then forget[#forget + 1] = id end
      else
        redis.call('HSET', done, id, list_of(set))
      end
    else
      -- Deleted while pending: let it go.
      leaving[#leaving + 1] = id
      if prior then forget[#forget + 1] = id end
    end
  end
end
if #leaving > 0 then
  redis.call('XACK', q, group, unpack(leaving))
  redis.call('XDEL', q, unpack(leaving))
end
if #forget > 0 then redis.call('HDEL', done, unpack(forget)) end
add_surplus(surplus, left - freed)
return {records_waiting(q, surplus), redis.call('DECRBY', bytes, freed_bytes), redis.call('XLEN', q)}
