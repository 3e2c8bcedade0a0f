"""Jobs: what the bundle's ``python_wheel_task`` runs. The CLI (flags -> the same options -> the API), the
demo, workspace checks (preflight). The SparkSession is made here, at the edge; every step runs through
the API.

May import: ``api``, ``errors``, ``runtime``, ``version``.

Nothing imports this folder but the entry point.
"""
