-- wrk: every twentieth request goes to /defer?0.1, which defers 0.1 s of work;
-- the rest to /. one_in_twenty_plain.lua makes the same Lua calls for / only,
-- so both sides of the capacity comparison cost wrk the same.
local n = 0
request = function()
  n = n + 1
  if n % 20 == 0 then
    return wrk.format("GET", "/defer?0.1")
  end
  return wrk.format("GET", "/")
end
