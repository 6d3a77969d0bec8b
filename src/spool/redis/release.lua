#!lua
-- Hands this consumer's unacknowledged entries back to the queue on a clean stop, so that the other
-- replicas deliver them at once instead of after claim_idle: each is queued again at the end (a new id,
-- the same record) and its old entry acked and deleted, in one step. KEYS[1]: queue.
-- ARGV: group, consumer. Answers how many were handed back.
local q, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local ok, pending = pcall(redis.call, 'XPENDING', q, group, '-', '+', 10000, consumer)
if not ok or not pending then return 0 end
local n = 0
for _, p in ipairs(pending) do
  local e = redis.call('XRANGE', q, p[1], p[1])
  if e[1] then
    redis.call('XADD', q, '*', 'r', e[1][2][2])
    n = n + 1
  end
  redis.call('XACK', q, group, p[1])
  redis.call('XDEL', q, p[1])
end
return n
