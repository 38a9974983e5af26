"""I/O: the listening socket (``listener``), one web server connection's socket and
output buffer (``channel``), and the epoll loop over them all (``loop``)."""
