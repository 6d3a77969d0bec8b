#!lua
-- Keeps this consumer's claims fresh: every pack it holds unacknowledged is claimed again with no
-- minimum idle time, which resets its idle time (JUSTID: the delivery count stays). Another replica
-- takes over only what a replica stopped refreshing. KEYS[1]: queue. ARGV: group, consumer.
-- Answers the ids of the packs it holds.
local q, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local ok, pending = pcall(redis.call, 'XPENDING', q, group, '-', '+', 10000, consumer)
if not ok or not pending then return {} end
local args, ids = {}, {}
local function claim()
  if #args > 0 then
    table.insert(args, 1, 'XCLAIM'); table.insert(args, 2, q); table.insert(args, 3, group)
    table.insert(args, 4, consumer); table.insert(args, 5, 0)
    args[#args + 1] = 'JUSTID'
    redis.call(unpack(args))
    args = {}
  end
end
for _, p in ipairs(pending) do
  args[#args + 1] = p[1]
  ids[#ids + 1] = p[1]
  if #args == 500 then claim() end
end
claim()
return ids
