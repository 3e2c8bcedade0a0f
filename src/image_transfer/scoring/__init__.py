"""Scoring: options (every keyword once), the scored DataFrame (validation, shipping, spreading, Arrow
batches), the worker side, statistics, the run handle, progress, and Spark's streaming checkpoint layout
(``streaming``, one adapter). The engines, one module each behind one interface, are in ``engines/``.

May import: ``errors``, ``runtime``, ``storage``, ``imaging``, ``models``, ``devices``.
"""
