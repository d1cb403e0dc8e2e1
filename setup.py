"""Build shim: the project metadata lives in setup.cfg.

The one compiled part is a small shared library for LD_PRELOAD (a ``sched_yield``
that can sleep, ``dbs_hvd/quiet_yield.py``); it is built as an extension so that
``pip install`` compiles it next to the package.
"""
from setuptools import Extension, setup

setup(ext_modules=[Extension("dbs_hvd._quiet_yield", ["dbs_hvd/_quiet_yield.c"])])
