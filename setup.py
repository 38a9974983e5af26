"""Packaging is declared in setup.cfg; this file only adds the optional compiled core.

``FCGI_FINISH_COMPILE=1`` compiles the sans-I/O wire core (``COMPILED``) with mypyc,
which then needs mypy and a C compiler: ``pip install mypy setuptools wheel`` first,
then ``FCGI_FINISH_COMPILE=1 pip install --no-build-isolation .`` (or
``python setup.py build_ext --inplace`` in a checkout: ``make compiled``). Without it,
the default, the package is pure Python and installs anywhere; the modules are the
same source either way, so the same tests run on both.
"""

import os

from setuptools import setup

COMPILED = ["fcgi/wire/records.py", "fcgi/wire/connection.py"]


def compiled_modules() -> list:
    if os.environ.get("FCGI_FINISH_COMPILE") != "1":
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        raise SystemExit(
            "FCGI_FINISH_COMPILE=1 needs mypyc: pip install mypy setuptools wheel, then "
            "pip install --no-build-isolation (or unset FCGI_FINISH_COMPILE for pure Python)"
        ) from None
    return mypycify(COMPILED, opt_level="3", separate=True)


setup(ext_modules=compiled_modules())
