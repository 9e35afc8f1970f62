-- wrk script for bench/callbacks.py: POST pre-generated bodies, one file per thread.
--
--   wrk -t2 -c16 -d15s --latency -s bench/wrk_bodies.lua http://127.0.0.1:PORT/path -- PREFIX [MS]
--
-- Thread N reads PREFIX.N (one request body per line) and sends its lines in order,
-- so no two threads share a body. When a thread runs out it starts again from its
-- first line (those requests are then re-deliveries); done() reports how often.
-- MS, when given and positive, is a pause in milliseconds before each request of a
-- connection (wrk's delay()), to hold the load below saturation.
-- done() prints one machine-readable line starting with BENCH_RESULT.

local threads = {}
local counter = 0

function setup(thread)
   thread:set("tid", counter)
   counter = counter + 1
   table.insert(threads, thread)
end

function init(args)
   local prefix = args[1]
   local pause_ms = tonumber(args[2] or "0") or 0
   if pause_ms > 0 then
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

function request()
   idx = idx + 1
   if idx > nbodies then
      idx = 1
      wraps = wraps + 1
   end
   sent = sent + 1
   return requests[idx]
end

function done(summary, latency, _requests)
   local bodies, sent_total, wraps_total = 0, 0, 0
   for _, thread in ipairs(threads) do
      bodies = bodies + thread:get("nbodies")
      sent_total = sent_total + thread:get("sent")
      wraps_total = wraps_total + thread:get("wraps")
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
