-- wrk: POST a 5 MB body to the path given on the command line.
wrk.method = "POST"
wrk.body = string.rep("0123456789abcdef", 5 * 1024 * 1024 / 16)
wrk.headers["Content-Type"] = "application/octet-stream"
