"""Images: screening encoded bytes per row, the TensorFlow decode graph, reading folders of image files.

May import: ``errors``, ``session``. Nothing else of the package (the bottom layer with ``models``).
"""
