-- wrk script for bench/callbacks.py: POST pre-generated bodies, one file per thread.
--
--   wrk -t1 -c8 -d15s --latency -s bench/wrk_bodies.lua http://127.0.0.1:PORT/path -- PREFIX [MS]
--   wrk -t16 -c16 -d15s -s bench/wrk_bodies.lua http://127.0.0.1:PORT/path -- PREFIX @INTERVAL
--
-- Thread N reads PREFIX.N (one request body per line) and sends its lines in order,
-- so no two threads share a body. When a thread runs out it starts again from its
-- first line (those requests are then re-deliveries); done() reports how often.
-- MS, when given and positive, is a pause in milliseconds before each request of a
-- connection (wrk's delay()), to hold the load below saturation.
-- @INTERVAL paces instead: each thread (give it exactly one connection) sends its
-- k-th request at start + k * INTERVAL ms, and each latency is measured from that
-- scheduled time, not from when the request left (as wrk2 does): a request that had
-- to wait for the previous answer carries the wait, so the percentiles are those of
-- an open-loop load at threads * 1000 / INTERVAL req/s, without coordinated omission.
-- done() prints one machine-readable line starting with BENCH_RESULT.

local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clock_id, bench_timespec *tp);
]]
local CLOCK_MONOTONIC = 1
local timespec = ffi.new("bench_timespec")

local function now_ms()
   ffi.C.clock_gettime(CLOCK_MONOTONIC, timespec)
   return tonumber(timespec.tv_sec) * 1000 + tonumber(timespec.tv_nsec) / 1e6
end

local threads = {}
local counter = 0

function setup(thread)
   thread:set("tid", counter)
   counter = counter + 1
   table.insert(threads, thread)
end

function init(args)
   local prefix = args[1]
   local mode = args[2] or "0"
   local pause_ms = tonumber(mode) or 0
   paced = 0
   lat = {}
   non_2xx = 0
   if mode:sub(1, 1) == "@" then
      paced = 1
      local interval = assert(tonumber(mode:sub(2)), "@INTERVAL must be a number")
      -- Threads start spread over one interval (golden-ratio offsets by thread id).
      local next_at = now_ms() + 100 + ((tid * 0.6180339887) % 1) * interval
      local scheduled = next_at
      function delay()
         local wait = next_at - now_ms()
         return wait > 0 and math.ceil(wait) or 0
      end
      function request()
         scheduled = next_at
         next_at = next_at + interval
         return next_request()
      end
      function response(status, _headers, _body)
         lat[#lat + 1] = now_ms() - scheduled
         if status < 200 or status > 299 then
            non_2xx = non_2xx + 1
         end
      end
   elseif pause_ms > 0 then
      -- Defined only when asked for: wrk checks for delay() after thread 0's init().
      function delay()
         return pause_ms
      end
   end
   local file = assert(io.open(prefix .. "." .. tid, "r"))
   requests = {}
   for line in file:lines() do
      if #line > 0 then
         local headers = { ["Content-Type"] = "application/json" }
         requests[#requests + 1] = wrk.format("POST", nil, headers, line)
      end
   end
   file:close()
   assert(#requests > 0, "no bodies in " .. prefix .. "." .. tid)
   nbodies = #requests
   idx = 0
   sent = 0
   wraps = 0
end

function next_request()
   idx = idx + 1
   if idx > nbodies then
      idx = 1
      wraps = wraps + 1
   end
   sent = sent + 1
   return requests[idx]
end

-- Replaced in init() when pacing.
function request()
   return next_request()
end

local function percentile(sorted, p)
   if #sorted == 0 then
      return 0
   end
   local rank = math.max(1, math.ceil(p / 100 * #sorted))
   return sorted[rank]
end

function done(summary, latency, _requests)
   local bodies, sent_total, wraps_total = 0, 0, 0
   local all, paced_non_2xx, paced_mode = {}, 0, false
   for _, thread in ipairs(threads) do
      bodies = bodies + thread:get("nbodies")
      sent_total = sent_total + thread:get("sent")
      wraps_total = wraps_total + thread:get("wraps")
      if thread:get("paced") == 1 then
         paced_mode = true
         paced_non_2xx = paced_non_2xx + thread:get("non_2xx")
         for _, ms in ipairs(thread:get("lat")) do
            all[#all + 1] = ms
         end
      end
   end
   if paced_mode then
      table.sort(all)
      io.write(string.format(
         "BENCH_PACED {\"answers\": %d, \"non_2xx\": %d, \"p50_ms\": %.3f, " ..
         "\"p90_ms\": %.3f, \"p99_ms\": %.3f, \"max_ms\": %.3f}\n",
         #all, paced_non_2xx, percentile(all, 50), percentile(all, 90),
         percentile(all, 99), percentile(all, 100)))
   end
   local e = summary.errors
   io.write(string.format(
      "BENCH_RESULT {\"requests\": %d, \"duration_us\": %d, \"bytes\": %d, " ..
      "\"errors_connect\": %d, \"errors_read\": %d, \"errors_write\": %d, " ..
      "\"errors_status\": %d, \"errors_timeout\": %d, " ..
      "\"lat_mean_us\": %.1f, \"lat_max_us\": %d, \"p50_us\": %d, \"p90_us\": %d, " ..
      "\"p99_us\": %d, \"p999_us\": %d, \"bodies\": %d, \"sent\": %d, \"wraps\": %d}\n",
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.mean, latency.max, latency:percentile(50), latency:percentile(90),
      latency:percentile(99), latency:percentile(99.9), bodies, sent_total, wraps_total))
end
