"""Images: screening encoded bytes per row (limits, headers, per-row errors), the TensorFlow decode graph,
reading folders of image files.

May import: ``errors``, ``runtime``, ``storage``.
"""
