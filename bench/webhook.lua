-- wrk script for bench/webhook.py: replays pre-signed Twilio webhooks, each thread its own share,
-- from a given line on (args: file, stride, first line).
local requests = {}
local next_index = 0
local stride = 1

function setup(thread)
  thread:set("thread_id", setup_count or 0)
  setup_count = (setup_count or 0) + 1
end

function init(args)
  stride = tonumber(args[2])
  for line in io.lines(args[1]) do
    local path, body, sig = line:match("^([^\t]*)\t([^\t]*)\t([^\t]*)$")
    requests[#requests + 1] = wrk.format("POST", path, {
      ["Content-Type"] = "application/x-www-form-urlencoded",
      ["X-Twilio-Signature"] = sig,
    }, body)
  end
  next_index = thread_id + tonumber(args[3] or 0)  -- where this server's previous run stopped: no request twice
end

function request()
  local r = requests[(next_index % #requests) + 1]
  next_index = next_index + stride
  return r
end
