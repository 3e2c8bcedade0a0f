#!/usr/bin/env bash
# Run the test suite in a second environment that mirrors Databricks Runtime 17.3 LTS ML's versions
# (pyspark 4.0, TensorFlow 2.19 / Keras 3.10, pyarrow 19, pandas 2, numpy 2, no Petastorm: the Arrow
# data path) on the runtime's Python, 3.12. Run from the repo root; needs only uv and a Python 3.12:
# DBR17_PYTHON, else one uv finds (a pyenv install included), else one uv downloads.
#
#   bash .ci/dbr17.sh                 # whole suite
#   bash .ci/dbr17.sh tests/test_feed.py -x   # arguments go to pytest
#
# The venv (DBR17_VENV, default .venv-dbr17-py312) is reused when its requirements are unchanged.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv="${DBR17_VENV:-.venv-dbr17-py312}"
reqs=".ci/dbr17-requirements.txt"
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$reqs" pyproject.toml | sha256sum | cut -d' ' -f1)"

if [[ ! -x "$venv/bin/python" || ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    echo "dbr17: creating $venv from $reqs"
    rm -rf "$venv"
    python="${DBR17_PYTHON:-}"
    if [[ -z "$python" ]]; then
        # uv looks on PATH; a pyenv shim for a version not selected fails there, so look in pyenv's tree too.
        python="$(uv python find 3.12 2>/dev/null || ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 2>/dev/null | tail -1 || true)"
    fi
    uv venv --quiet --python "${python:-3.12}" "$venv"
    VIRTUAL_ENV="$venv" uv pip install --quiet --compile-bytecode --python "$venv/bin/python" -r "$reqs"
    # The project itself, editable, without letting it change the pinned runtime versions.
    VIRTUAL_ENV="$venv" uv pip install --quiet --python "$venv/bin/python" --no-deps -e .
    echo "$want" > "$stamp"
fi

"$venv/bin/python" - <<'PY'
import importlib.util, keras, numpy, pandas, pyarrow, pyspark, sys, tensorflow
assert sys.version_info[:2] == (3, 12), f"dbr17: Python 3.12 expected (the runtime's), not {sys.version}"
print(f"dbr17: python {__import__('sys').version.split()[0]}, pyspark {pyspark.__version__}, "
      f"tensorflow {tensorflow.__version__}, keras {keras.__version__}, pyarrow {pyarrow.__version__}, "
      f"pandas {pandas.__version__}, numpy {numpy.__version__}, "
      f"petastorm {'present' if importlib.util.find_spec('petastorm') else 'absent'}")
PY

export PYSPARK_PYTHON="$PWD/$venv/bin/python"
export PYSPARK_DRIVER_PYTHON="$PWD/$venv/bin/python"
exec "$venv/bin/python" -m pytest -p no:cacheprovider "$@"
