#!/usr/bin/env bash
# Run the test suite in a second environment that mirrors Databricks Runtime 17.3 LTS ML's versions
# (pyspark 4.0, TensorFlow 2.19 / Keras 3.10, pyarrow 19, pandas 2, numpy 2, no Petastorm: the Arrow
# data path). Run from the repo root; needs only uv and a Python 3.11 it can find (or download).
#
#   bash .ci/dbr17.sh                 # whole suite
#   bash .ci/dbr17.sh tests/test_feed.py -x   # arguments go to pytest
#
# The venv (DBR17_VENV, default .venv-dbr17) is reused when its requirements are unchanged.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv="${DBR17_VENV:-.venv-dbr17}"
reqs=".ci/dbr17-requirements.txt"
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$reqs" pyproject.toml | sha256sum | cut -d' ' -f1)"

if [[ ! -x "$venv/bin/python" || ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    echo "dbr17: creating $venv from $reqs"
    rm -rf "$venv"
    uv venv --quiet --python 3.11 "$venv"
    VIRTUAL_ENV="$venv" uv pip install --quiet --python "$venv/bin/python" -r "$reqs"
    # The project itself, editable, without letting it change the pinned runtime versions.
    VIRTUAL_ENV="$venv" uv pip install --quiet --python "$venv/bin/python" --no-deps -e .
    echo "$want" > "$stamp"
fi

"$venv/bin/python" - <<'PY'
import importlib.util, keras, numpy, pandas, pyarrow, pyspark, tensorflow
print(f"dbr17: python {__import__('sys').version.split()[0]}, pyspark {pyspark.__version__}, "
      f"tensorflow {tensorflow.__version__}, keras {keras.__version__}, pyarrow {pyarrow.__version__}, "
      f"pandas {pandas.__version__}, numpy {numpy.__version__}, "
      f"petastorm {'present' if importlib.util.find_spec('petastorm') else 'absent'}")
PY

export PYSPARK_PYTHON="$PWD/$venv/bin/python"
export PYSPARK_DRIVER_PYTHON="$PWD/$venv/bin/python"
exec "$venv/bin/python" -m pytest -p no:cacheprovider "$@"
