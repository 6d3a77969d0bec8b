#!lua
-- Hands this consumer's unacknowledged records back to the queue on a clean stop, so that the other
-- replicas deliver them at once instead of after claim_idle: the records of each pack it holds that
-- are not done are queued again at the end (a new pack, the same records) and the old pack acked and
-- deleted, in one step. KEYS: queue, done hash. ARGV: group, consumer. Answers how many records were
-- handed back.
local q, done, group, consumer = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
local ok, pending = pcall(redis.call, 'XPENDING', q, group, '-', '+', 10000, consumer)
if not ok or not pending then return 0 end
local n = 0
for _, p in ipairs(pending) do
  local id = p[1]
  local e = redis.call('XRANGE', q, id, id)
  local prior = redis.call('HGET', done, id)
  if e[1] then
    local set = set_of(prior)
    local kept = {}
    for k, r in ipairs(records_of(e[1][2])) do
      if not set[k - 1] then kept[#kept + 1] = r end
    end
    if #kept > 0 then
      add_records(q, kept)
      n = n + #kept
    end
  end
  redis.call('XACK', q, group, id)
  redis.call('XDEL', q, id)
  if prior then redis.call('HDEL', done, id) end
end
return n
