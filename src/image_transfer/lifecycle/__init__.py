"""The model lifecycle with MLflow: tracking and registration, the pyfunc (no Spark of its own; it runs a
scoring engine, ``scoring.engines``). MLflow is imported lazily, inside functions.

May import: ``errors``, ``runtime``, ``version``, ``imaging``, ``models``, ``devices``, ``scoring``.
"""
