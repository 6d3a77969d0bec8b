-- Packs (prepended to every queue script; the Rust side is `pack.rs`, whose module doc is the design).
-- A queue entry holds the records of one request for one account: field `r` their bytes one after
-- another, field `l` their lengths ("212,198"). Without `l`, or with lengths that do not add up (or
-- name more than 1,024), an entry is one record. Indices already acked or dead-lettered of a pack are in the `done` hash.

local function field(fields, name)
  for i = 1, #fields, 2 do
    if fields[i] == name then return fields[i + 1] end
  end
end

-- A pack's records (a list of strings, index i + 1 for record i).
local function records_of(fields)
  local r, l = field(fields, 'r') or '', field(fields, 'l')
  if not l then return {r} end
  local out, at = {}, 1
  for len in string.gmatch(l .. ',', '([^,]*),') do
    if not string.match(len, '^%d+$') or at + tonumber(len) - 1 > #r then return {r} end
    out[#out + 1] = string.sub(r, at, at + tonumber(len) - 1)
    at = at + tonumber(len)
  end
  if #out == 0 or #out > 1024 or at - 1 ~= #r then return {r} end
  return out
end

-- "0,3,4" (or nil) as a set of indices, and its size.
local function set_of(list)
  local set, n = {}, 0
  for i in string.gmatch(list or '', '%d+') do
    local k = tonumber(i)
    if not set[k] then set[k], n = true, n + 1 end
  end
  return set, n
end

local function list_of(set)
  local out = {}
  for i in pairs(set) do out[#out + 1] = i end
  table.sort(out)
  return table.concat(out, ',')
end

-- The records of a pack that `given` ("*" or "0,3") names and `prior` (its done hash value, or nil)
-- does not, in index order; and the done set with them added, and its size.
local function newly_done(records, prior, given)
  local set, n = set_of(prior)
  local named = nil
  if given ~= '*' then named = set_of(given) end
  local new = {}
  for k = 0, #records - 1 do
    if (named == nil or named[k]) and not set[k] then
      set[k], n = true, n + 1
      new[#new + 1] = k
    end
  end
  return new, set, n
end

-- Adds a pack; its sequence number stays below 4096 (record ids hold 12 bits of it).
local function add_pack(q, bytes, lengths)
  local id = redis.call('XADD', q, '*', 'r', bytes, 'l', lengths)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  if tonumber(seq) >= 4096 then
    redis.call('XDEL', q, id)
    id = redis.call('XADD', q, string.format('%d-0', tonumber(ms) + 1), 'r', bytes, 'l', lengths)
  end
  return id
end

-- Adds a pack of the given records (a list of strings).
local function add_records(q, records)
  local lengths = {}
  for i, r in ipairs(records) do lengths[i] = #r end
  return add_pack(q, table.concat(records), table.concat(lengths, ','))
end

-- Waiting records: one per entry, plus every pack's open records beyond its first, counted in
-- `surplus` (which a request of one record per account never writes: a write in a script costs).
local function records_waiting(q, surplus)
  return redis.call('XLEN', q) + tonumber(redis.call('GET', surplus) or '0')
end

local function add_surplus(surplus, n)
  if n ~= 0 then redis.call('INCRBY', surplus, n) end
end
