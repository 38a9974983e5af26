-- wrk: the plain side of the capacity comparison. The same Lua calls as
-- one_in_twenty.lua, so both sides cost wrk the same, but every request goes to /.
local n = 0
request = function()
  n = n + 1
  if n % 20 == 0 then
    return wrk.format("GET", "/")
  end
  return wrk.format("GET", "/")
end
