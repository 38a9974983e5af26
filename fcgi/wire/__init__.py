"""The wire: FastCGI's records (``records``) and one connection's protocol state as a
sans-I/O state machine (``connection``). No sockets, threads, locks or WSGI."""
