-- wrk: every twentieth request goes to /defer?0.1, which defers 0.1 s of work;
-- the rest to /. DEFER_PATH=/ (the plain side of the capacity comparison) sends
-- every request to / with the same Lua calls, so both sides cost wrk the same.
-- PREFIX goes before both paths (which side of a worker serving several answers).
local prefix = os.getenv("PREFIX") or ""
local defer_path = prefix .. (os.getenv("DEFER_PATH") or "/defer?0.1")
local plain_path = prefix .. "/"
local n = 0
request = function()
  n = n + 1
  if n % 20 == 0 then
    return wrk.format("GET", defer_path)
  end
  return wrk.format("GET", plain_path)
end
