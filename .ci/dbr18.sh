#!/usr/bin/env bash
# The suite in the Databricks Runtime 18 LTS ML-like environment (.ci/dbr18-requirements.in says which
# versions and why): pyspark 4.1, TensorFlow 2.21 with Keras 3.15 installed as a user would, ai_edge_litert,
# no Petastorm. Same interface as .ci/dbr17.sh: arguments go to pytest; the venv (DBR18_VENV, default
# .venv-dbr18-py312) is reused while its requirements are unchanged; DBR18_PYTHON picks the Python 3.12.
exec bash "$(dirname "${BASH_SOURCE[0]}")/env.sh" dbr18 "$@"
