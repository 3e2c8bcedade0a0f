"""Models: the artifact (save, metadata, digest, pack/unpack), inspection on the driver, safe loading.

May import: ``errors``, ``session``, ``imaging``.
"""
