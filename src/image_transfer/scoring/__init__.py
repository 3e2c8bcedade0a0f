"""Scoring: options, the scored DataFrame, shipping, the worker side, GPU placement, statistics, the run
handle, incremental (streaming) scoring.

May import: ``errors``, ``session``, ``fs``, ``imaging``, ``models``, and ``lifecycle.uris`` (a leaf).
"""
