"""Training: prepare a labelled dataset, feed it to ``tf.data`` (Petastorm or Arrow), build and fit the
model (single node or a barrier stage of workers), evaluate, promote by alias.

May import: ``errors``, ``runtime``, ``version``, ``storage``, ``imaging``, ``models``, ``devices``,
``scoring``, ``lifecycle``.
"""
