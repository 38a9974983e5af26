-- wrk: every twentieth request defers 0.1 s of sleeping work, the rest are plain.
local n = 0
request = function()
  n = n + 1
  if n % 20 == 0 then
    return wrk.format("GET", "/defer?0.1")
  end
  return wrk.format("GET", "/")
end
