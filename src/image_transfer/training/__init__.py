"""Training: prepare a labelled dataset, feed it to ``tf.data`` (Petastorm or Arrow), build and fit the
model (single node or a barrier stage of workers), evaluate, promote by alias.

``prepare`` (the dataset), ``feed`` (its ``tf.data`` feeds, cached features), ``train`` (the orchestrator)
over ``config`` (``TrainConfig``, ``TrainResult``), ``build`` (the model), ``fit`` (the phases on this node),
``distributed`` (the image phases across workers), ``report`` (metrics, curves, MLflow); ``evaluate``,
``promotion``.

May import: ``errors``, ``runtime``, ``version``, ``storage``, ``imaging``, ``models``, ``devices``,
``scoring``, ``lifecycle`` (never the API or the jobs above it).
"""
