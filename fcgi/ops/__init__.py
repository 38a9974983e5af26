"""Operations: the worker's own log (``logs``), the access log, the pool's scoreboard
and status page, the slow-request watchdog, and the answers the worker gives itself."""
