"""The model lifecycle with MLflow: model URIs (a leaf the API imports), tracking and registration, the
pyfunc. MLflow is imported lazily, inside functions.

May import: ``errors``, ``imaging``, ``models``, ``scoring`` (the pyfunc runs a scoring engine, ``scoring.engines``).
``uris`` imports nothing of the package but ``errors``.
"""
