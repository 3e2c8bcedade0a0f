#!/usr/bin/env bash
# Run the test suite in a CI environment that mirrors a Databricks runtime's library versions on its
# Python (3.12): NAME is dbr17 (Runtime 17.3 LTS ML: pyspark 4.0, TensorFlow 2.19 / Keras 3.10), dbr18
# (Runtime 18 LTS ML: pyspark 4.1, TensorFlow 2.21 installed as a user would, ai_edge_litert) or latest
# (the newest pyspark, for the scoring tests). Requirements: .ci/NAME-requirements.txt. Needs only uv and a
# Python 3.12: NAME_PYTHON (e.g. DBR18_PYTHON), else one uv finds (a pyenv install included), else one uv
# downloads. The venv (NAME_VENV, default .venv-NAME-py312) is reused while its requirements are unchanged.
#
#   bash .ci/env.sh dbr18                      # whole suite
#   bash .ci/env.sh dbr18 tests/test_feed.py -x   # further arguments go to pytest
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
name="$1"
shift
upper="$(echo "$name" | tr '[:lower:]' '[:upper:]')"
venv_var="${upper}_VENV"
python_var="${upper}_PYTHON"
venv="${!venv_var:-.venv-$name-py312}"
reqs=".ci/$name-requirements.txt"
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$reqs" pyproject.toml | sha256sum | cut -d' ' -f1)"

if [[ ! -x "$venv/bin/python" || ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    echo "$name: creating $venv from $reqs"
    rm -rf "$venv"
    python="${!python_var:-}"
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

NAME="$name" "$venv/bin/python" - <<'PY'
import importlib.metadata as md, importlib.util, os, sys

name = os.environ["NAME"]
assert sys.version_info[:2] == (3, 12), f"{name}: Python 3.12 expected (the runtime's), not {sys.version}"


def version(package: str) -> str:
    try:
        return md.version(package)
    except md.PackageNotFoundError:
        return "absent"


tf = next((v for v in (version("tensorflow-cpu"), version("tensorflow")) if v != "absent"), "absent")
litert = version("ai-edge-litert")
interpreter = f"ai_edge_litert {litert}" if litert != "absent" else ("tf.lite" if tf != "absent" else "none")
print(
    f"{name}: python {sys.version.split()[0]}, pyspark {version('pyspark')}, tensorflow {tf}, "
    f"keras {version('keras')}, litert interpreter {interpreter}, pyarrow {version('pyarrow')}, "
    f"pandas {version('pandas')}, numpy {version('numpy')}, mlflow {version('mlflow-skinny')}, "
    f"petastorm {'present' if importlib.util.find_spec('petastorm') else 'absent'}"
)
PY

export PYSPARK_PYTHON="$PWD/$venv/bin/python"
export PYSPARK_DRIVER_PYTHON="$PWD/$venv/bin/python"
exec "$venv/bin/python" -m pytest -p no:cacheprovider "$@"
