"""Helpers shared by test modules of more than one file (no tests here).

``tests/`` is on ``sys.path`` (pytest inserts the rootdir of ``tests/conftest.py``), so test
modules import ``helpers.<module>``; a test module never imports another test module. Scripts run
in subprocesses find these modules through ``PYTHONPATH`` (with ``tests/`` on it).
"""
