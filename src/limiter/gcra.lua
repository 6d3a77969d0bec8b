#!lua
-- One ad account's budget: the GCRA of `limiter::Gcra`, in integer microseconds on one clock for
-- the whole fleet (Redis's TIME), and X's shared hold.
-- KEYS[1]: the theoretical arrival time (TAT, epoch µs); KEYS[2]: X's hold (epoch µs).
-- ARGV: op, interval µs (T, rounded up), burst b, n (events; for "hold": until, epoch µs),
--       now µs ("" = Redis's TIME; a number only in the conformance suite, to run on its clock).
-- Answers {at, tat, now, hold}: when the events may go, the TAT after, the clock, the hold.
-- Integers only: a µs count in a Lua string conversion would turn into exponent form.
local op = ARGV[1]
local interval = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local n = tonumber(ARGV[4])
local now
if ARGV[5] ~= '' then
  now = tonumber(ARGV[5])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local hold = tonumber(redis.call('GET', KEYS[2]) or '0')

local function keep(new_tat)
  -- Past the TAT the key means nothing more than a fresh one: let it expire then (and a second later).
  local ttl_ms = math.floor((new_tat - now) / 1000) + 1000
  if ttl_ms > 0 then
    redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', string.format('%d', ttl_ms))
  end
end

if op == 'reserve' then
  if n > burst then n = burst end
  local from = math.max(now, hold)
  local at = math.max(from, tat - (burst - n) * interval)
  local new_tat = math.max(tat, at) + n * interval
  keep(new_tat)
  return {at, new_tat, now, hold}
elseif op == 'refund' then
  if n > burst then n = burst end
  local new_tat = math.max(tat - n * interval, 0)
  keep(new_tat)
  return {now, new_tat, now, hold}
elseif op == 'hold' then
  if n > hold and n > now then
    hold = n
    redis.call('SET', KEYS[2], string.format('%d', hold), 'PX', string.format('%d', math.floor((hold - now) / 1000) + 1000))
  end
  return {now, tat, now, hold}
else
  return {now, tat, now, hold}
end
