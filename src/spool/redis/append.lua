#!lua
-- Queues one ingest request's records, each after its dedup check, in one step.
-- KEYS: per account touched, its queue stream and its waiting-bytes counter (2 keys each, A accounts),
--       then one dedup key per record.
-- ARGV[1]: the dedup window (ms); ARGV[2]: A; then per record: account index (1..A), received_at_ms,
--       the encoded record.
-- A record is a duplicate when its dedup key holds a received_at less than the window before its own
-- (the key's expiry only cleans up). Answers, per account, {length, bytes}, then per record its
-- stream id, or "" for a duplicate.
local window = tonumber(ARGV[1])
local accounts = tonumber(ARGV[2])
local ids = {}
for i = 2 * accounts + 1, #KEYS do
  local r = i - 2 * accounts
  local a = tonumber(ARGV[3 * r])
  local at = tonumber(ARGV[3 * r + 1])
  local record = ARGV[3 * r + 2]
  local seen = redis.call('GET', KEYS[i])
  if seen and at - tonumber(seen) < window then
    ids[#ids + 1] = ''
  else
    ids[#ids + 1] = redis.call('XADD', KEYS[2 * a - 1], '*', 'r', record)
    redis.call('INCRBY', KEYS[2 * a], #record)
    redis.call('SET', KEYS[i], string.format('%d', at), 'PX', string.format('%d', window + 1000))
  end
end
local out = {}
for a = 1, accounts do
  out[#out + 1] = redis.call('XLEN', KEYS[2 * a - 1])
  out[#out + 1] = tonumber(redis.call('GET', KEYS[2 * a]) or '0')
end
for _, id in ipairs(ids) do
  out[#out + 1] = id
end
return out
