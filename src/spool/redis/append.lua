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
local px = window + 1000
local accounts = tonumber(ARGV[2])
local first = 2 * accounts
local out, added = {}, {}
for a = 1, accounts do added[a] = 0 end
local n = 2 * accounts
for i = first + 1, #KEYS do
  local r = 3 * (i - first)
  local a = tonumber(ARGV[r])
  local at = ARGV[r + 1]
  local record = ARGV[r + 2]
  -- One command for the check and the mark: the key now holds this record's time, and said what it held.
  local seen = redis.call('SET', KEYS[i], at, 'PX', px, 'GET')
  n = n + 1
  if seen and tonumber(at) - tonumber(seen) < window then
    -- A duplicate: the key keeps the time of the record that was queued.
    redis.call('SET', KEYS[i], seen, 'PX', px)
    out[n] = ''
  else
    out[n] = redis.call('XADD', KEYS[2 * a - 1], '*', 'r', record)
    added[a] = added[a] + #record
  end
end
for a = 1, accounts do
  out[2 * a - 1] = redis.call('XLEN', KEYS[2 * a - 1])
  out[2 * a] = redis.call('INCRBY', KEYS[2 * a], added[a])
end
return out
