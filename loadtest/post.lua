-- wrk script: POST the body in $WRK_BODY_FILE with $WRK_CONTENT_TYPE and $WRK_KEY.
-- Fails loudly if any answer is not 204 (a benchmark that counts errors as throughput is void).
-- WRK_SUBJECTS=N (default 1) cycles the requests through N copies of the body whose subject is
-- suffixed "-0" … "-(N-1)", so that the events spread over partitions as many customers' would.
local f = assert(io.open(os.getenv("WRK_BODY_FILE"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
local subjects = tonumber(os.getenv("WRK_SUBJECTS") or "1") or 1
local bodies = {}
if subjects > 1 then
  for i = 0, subjects - 1 do
    bodies[i + 1] = wrk.body:gsub('("subject"%s*:%s*")([^"]*)"', '%1%2-' .. i .. '"')
  end
end
wrk.headers["Content-Type"] = os.getenv("WRK_CONTENT_TYPE") or "application/cloudevents+json"
local key = os.getenv("WRK_KEY")
if key and key ~= "" then wrk.headers["Authorization"] = "Bearer " .. key end

local n = 0
request = function()
  if subjects <= 1 then return wrk.format() end
  n = n + 1
  return wrk.format(nil, nil, nil, bodies[(n % subjects) + 1])
end

local bad = 0
response = function(status, headers, body)
  if status ~= 204 then bad = bad + 1 end
end

done = function(summary, latency, requests)
  local errors = summary.errors.status + summary.errors.connect + summary.errors.read
    + summary.errors.write + summary.errors.timeout
  io.write(string.format("RESULT requests=%d seconds=%.3f non204=%d errors=%d p50_ms=%.3f p99_ms=%.3f\n",
    summary.requests, summary.duration / 1e6, summary.errors.status, errors,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
