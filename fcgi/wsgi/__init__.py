"""The WSGI side: a request's environ, ``start_response`` and body (``request``), its
streams (``streams``), and the runners that call the app (``runners``)."""
