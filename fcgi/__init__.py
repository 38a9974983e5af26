"""A FastCGI worker for WSGI apps that can finish the response early.

``python -m fcgi MODULE:CALLABLE`` (or ``fcgi-serve``) serves the app; each
request's environ carries ``fcgi.finish_request``, PHP's
``fastcgi_finish_request()`` for WSGI.
"""

__version__ = "0.1.0"
