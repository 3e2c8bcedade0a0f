"""Training: prepare a labelled dataset, feed it to ``tf.data`` (Petastorm or Arrow), train, evaluate,
promote by alias.

May import: ``errors``, ``session``, ``fs``, ``imaging``, ``models``, ``scoring``, ``lifecycle``, ``api``.
"""
