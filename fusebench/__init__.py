"""The ``fusebench`` command line: the one package above fusion, bench, sweeps and dashboards.

It only wires their sub-commands together (``fusebench.cli``); no package below imports it.
"""
