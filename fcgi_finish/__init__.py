"""The stack as one program: ``fcgi-finish start|stop|reload|status|...`` runs nginx in
front of a pool of ``fcgi`` workers under supervisord, from one saved configuration.

One floor above both ``fcgi`` (the worker) and ``wsgi_app`` (the middleware): it may
import both; neither imports it. ``settings`` (the table), ``config`` (the saved file),
``render`` (the templates), ``checks`` (before start), ``supervisor`` (talking to
supervisord), ``readiness`` (whether a start worked), ``stack`` (its life),
``reloads`` (a reload's outcome per worker), ``reference`` (docs/configuration.md,
made from the tables), ``cli`` (the command).
"""
