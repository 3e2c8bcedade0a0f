"""Models: the artifact (save, metadata, digest, pack/unpack), inspection on the driver without TensorFlow,
safe loading, LiteRT interpreters, and model URIs (paths and MLflow registry URIs resolved to one version).

May import: ``errors``, ``runtime``, ``imaging``.
"""
