-- wrk: every twentieth request goes to the path in DEFER_PATH (default /defer?0.1),
-- the rest to /. With DEFER_PATH=/ it makes the same Lua calls for plain requests
-- only, so both sides of the comparison cost wrk the same.
local n = 0
local special = os.getenv("DEFER_PATH") or "/defer?0.1"
request = function()
  n = n + 1
  if n % 20 == 0 then
    return wrk.format("GET", special)
  end
  return wrk.format("GET", "/")
end
