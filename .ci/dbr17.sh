#!/usr/bin/env bash
# The suite in an environment that mirrors Databricks Runtime 17.3 LTS ML's versions (pyspark 4.0,
# TensorFlow 2.19 / Keras 3.10, pyarrow 19, pandas 2, numpy 2, no Petastorm: the Arrow data path) on the
# runtime's Python, 3.12 (.ci/dbr17-requirements.in). Run from anywhere; needs only uv and a Python 3.12:
# DBR17_PYTHON, else one uv finds (a pyenv install included), else one uv downloads.
#
#   bash .ci/dbr17.sh                 # whole suite
#   bash .ci/dbr17.sh tests/test_feed.py -x   # arguments go to pytest
#
# The venv (DBR17_VENV, default .venv-dbr17-py312) is reused when its requirements are unchanged.
exec bash "$(dirname "${BASH_SOURCE[0]}")/env.sh" dbr17 "$@"
