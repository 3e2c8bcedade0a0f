"""Storage: file systems (local, Hadoop, mounted), atomic outputs (staging, marker, swap, recovery), tables,
and leases (one writer per output). Below scoring and training, which write through it.

May import: ``errors``, ``runtime``.
"""
