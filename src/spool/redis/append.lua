#!lua
-- Queues one ingest request's records, each after its dedup check, in one step: per account, its new
-- records as one or more packs.
-- KEYS: per account touched (A of them), its queue, waiting-bytes counter, surplus counter (3 keys
--       each); then one dedup key per record, in the order of the packs.
-- ARGV[1]: the dedup window (ms); ARGV[2]: A; ARGV[3]: P, the packs; then per pack: its account's index
--       (1..A), its record count, its lengths, its bytes; then per record (same order as the dedup keys)
--       its received_at_ms.
-- A record is a duplicate when its dedup key holds a received_at less than the window before its own
-- (the key's expiry only cleans up); a pack is stored without its duplicates. Answers, per account,
-- {records, bytes, entries}, then per record 1 if queued, "" for a duplicate.
local window = tonumber(ARGV[1])
local px = window + 1000
local accounts, packs = tonumber(ARGV[2]), tonumber(ARGV[3])
local out, added_bytes, added = {}, {}, {}
for a = 1, accounts do
  added_bytes[a], added[a] = 0, 0
end
local key = 3 * accounts
local at_arg = 3 + 4 * packs
local n = 3 * accounts
for p = 1, packs do
  local base = 3 + 4 * (p - 1)
  local a, count, lengths, bytes = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2]), ARGV[base + 3], ARGV[base + 4]
  local dup = {}
  for j = 1, count do
    key, at_arg, n = key + 1, at_arg + 1, n + 1
    local at = ARGV[at_arg]
    -- One command for the check and the mark: the key now holds this record's time, and said what it held.
    local seen = redis.call('SET', KEYS[key], at, 'PX', px, 'GET')
    if seen and tonumber(at) - tonumber(seen) < window then
      -- A duplicate: the key keeps the time of the record that was queued.
      redis.call('SET', KEYS[key], seen, 'PX', px)
      dup[j] = true
      out[n] = ''
    else
      out[n] = 1
    end
  end
  local q = KEYS[3 * a - 2]
  if next(dup) == nil then
    add_pack(q, bytes, lengths)
    added_bytes[a], added[a] = added_bytes[a] + #bytes, added[a] + count - 1
  else
    local kept = {}
    for j, r in ipairs(records_of({'r', bytes, 'l', lengths})) do
      if not dup[j] then kept[#kept + 1] = r end
    end
    if #kept > 0 then
      add_records(q, kept)
      added_bytes[a], added[a] = added_bytes[a] + #table.concat(kept), added[a] + #kept - 1
    end
  end
end
for a = 1, accounts do
  add_surplus(KEYS[3 * a], added[a])
  out[3 * a - 2] = records_waiting(KEYS[3 * a - 2], KEYS[3 * a])
  out[3 * a - 1] = redis.call('INCRBY', KEYS[3 * a - 1], added_bytes[a])
  out[3 * a] = redis.call('XLEN', KEYS[3 * a - 2])
end
return out
