"""Jobs: what the bundle's ``python_wheel_task`` runs. The CLI (argparse only) and its commands, the
demo, reading inputs and writing outputs atomically, run summaries, progress, workspace checks.

May import everything below it; nothing imports ``jobs`` but the ``image-transfer`` entry point.
"""
