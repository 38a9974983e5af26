"""The application side: run work after the response in any WSGI app.

What users import: ``wsgi_app.deferred`` (the middleware, ``defer``,
``finish_request``), ``wsgi_app.django_tasks`` (a Django Tasks backend),
``wsgi_app.flask_support``, ``wsgi_app.background`` (a command after the
response) and ``wsgi_app.celery`` (the Celery app for ``DEFERRED_CELERY``).
The demo app is ``wsgi_app.demo:application``.
"""
