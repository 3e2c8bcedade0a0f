"""The Databricks asset bundle: job files, wheel entry points and task parameters.

Offline stand-ins for ``databricks bundle validate``: each job passes the typed model of
``databricks-bundles`` after the bundle's variables are substituted, each wheel task names an
entry point the wheel declares, and each task's parameters parse with the real CLI parser.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

from image_transfer.jobs.cli import build_parser  # noqa: E402
from image_transfer.runtime import SETTINGS  # noqa: E402

# The outcome does not depend on library versions: CI runs this file in the default environment only.
pytestmark = pytest.mark.anyversion

try:
    import tomllib
except ImportError:  # pragma: no cover - Python 3.10
    tomllib = None

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
BUNDLE = yaml.safe_load((ROOT / "databricks.yml").read_text())
JOB_FILES = sorted((ROOT / "resources").glob("*.yml"))
TARGETS = sorted(BUNDLE["targets"])

# What the CLI resolves at deploy time, and what the job service resolves at run time.
BUILTINS = {
    "workspace.current_user.userName": "someone@example.com",
    "workspace.current_user.short_name": "someone",
    "bundle.name": BUNDLE["bundle"]["name"],
}
RUN_TIME = {"job.run_id": "1234567", "job.start_time.iso_date": "2024-05-01"}
TASK_VALUE_SAMPLE = "/Volumes/main/s/v/models/from_task_value.keras"
# What a deploy passes with --var: prod names no notification address of its own.
DEPLOY_VARS = {"prod": {"notification_email": "ml-oncall@example.com"}}

VAR_REF = re.compile(r"\$\{([A-Za-z0-9_.\-]+)\}")
DYN_REF = re.compile(r"\{\{\s*([A-Za-z0-9_.\-]+)\s*\}\}")


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


def jobs_of(path: Path) -> dict:
    return (load(path).get("resources") or {}).get("jobs") or {}


def variables(target: str, given: dict | None = None) -> dict:
    """Variable values for ``target``: defaults, the target's overrides, then ``given`` (``--var``).

    ``given`` defaults to ``DEPLOY_VARS[target]``. As in ``databricks bundle validate``, a declared variable
    left without a value raises ``KeyError("no value assigned to required variable ...")``.
    """
    values = {name: spec["default"] for name, spec in BUNDLE["variables"].items() if "default" in (spec or {})}
    for name, value in ((BUNDLE["targets"][target] or {}).get("variables") or {}).items():
        values[name] = value.get("default") if isinstance(value, dict) else value
    values.update(DEPLOY_VARS.get(target, {}) if given is None else given)
    missing = sorted(set(BUNDLE["variables"]) - set(values))
    if missing:
        raise KeyError(f"no value assigned to required variable {missing[0]}")
    return values


def substitute(node, refs: dict):
    """Replace every ``${...}`` (a whole-string reference keeps the value's type); unknown ones raise."""
    if isinstance(node, dict):
        return {k: substitute(v, refs) for k, v in node.items()}
    if isinstance(node, list):
        return [substitute(v, refs) for v in node]
    if not isinstance(node, str):
        return node
    whole = VAR_REF.fullmatch(node)
    if whole:
        return substitute(refs[whole.group(1)], refs)
    return VAR_REF.sub(lambda m: str(substitute(refs[m.group(1)], refs)), node)


def resolved(target: str, node, given: dict | None = None):
    refs = dict(BUILTINS, **{"bundle.target": target})
    refs.update({f"var.{k}": v for k, v in variables(target, given).items()})
    return substitute(node, refs)


def upstream(job: dict, task_key: str) -> set[str]:
    tasks = {t["task_key"]: t for t in job["tasks"]}
    seen: set[str] = set()
    todo = [d["task_key"] for d in tasks[task_key].get("depends_on", [])]
    while todo:
        key = todo.pop()
        if key not in seen:
            seen.add(key)
            todo += [d["task_key"] for d in tasks[key].get("depends_on", [])]
    return seen


def run_time_values(job: dict, task: dict) -> list[str]:
    """The task's parameters as the job service hands them over; unknown references raise."""
    defaults = {p["name"]: str(p["default"]) for p in job.get("parameters", [])}

    def value(match: re.Match) -> str:
        ref = match.group(1)
        if ref.startswith("job.parameters."):
            return defaults[ref.removeprefix("job.parameters.")]
        if ref.startswith("tasks."):
            _, producer, kind, _key = ref.split(".")
            assert kind == "values", ref
            assert producer in upstream(job, task["task_key"]), f"{ref}: {producer} does not run before"
            return TASK_VALUE_SAMPLE
        return RUN_TIME[ref]

    return [DYN_REF.sub(value, str(p)) for p in task["python_wheel_task"]["parameters"]]


def all_tasks(target: str = "dev"):
    for path in JOB_FILES:
        for job_key, job in jobs_of(path).items():
            job = resolved(target, job)
            for task in job["tasks"]:
                yield path.name, job_key, job, task


def wheel_tasks(target: str = "dev"):
    return [(f, k, j, t) for f, k, j, t in all_tasks(target) if "python_wheel_task" in t]


def task_id(item) -> str:
    return f"{item[1]}.{item[3]['task_key']}"


def parse(params: list[str]):
    try:
        return build_parser().parse_args(params)
    except SystemExit as exc:
        pytest.fail(f"image-transfer {' '.join(params)} does not parse (exit {exc.code})")


def test_bundle_includes_one_job_per_file():
    assert BUNDLE["include"] == ["resources/*.yml"]
    assert len(JOB_FILES) >= 2
    for path in JOB_FILES:
        jobs = jobs_of(path)
        assert len(jobs) == 1, f"{path.name}: one job per file"
        assert path.name == f"{next(iter(jobs))}.job.yml"


def test_artifact_builds_the_wheel_and_tasks_install_it():
    artifact = BUNDLE["artifacts"]["python_artifact"]
    assert artifact["type"] == "whl" and artifact["build"] == "uv build --wheel"
    for _, _, _, task in all_tasks():
        assert {"whl": "../dist/*.whl"} in task.get("libraries", []), task["task_key"]


def _whl_paths(value):
    if isinstance(value, dict):
        return ([value["whl"]] if isinstance(value.get("whl"), str) else []) + [
            w for v in value.values() for w in _whl_paths(v)
        ]
    if isinstance(value, list):
        return [w for v in value for w in _whl_paths(v)]
    return []


def test_every_wheel_path_resolves_inside_the_bundle_from_its_own_file():
    """The CLI resolves a library path relative to the file that holds it: the root file's targets
    (``databricks.yml``) and resources/*.yml must both name the bundle's own ``dist/``."""
    found = 0
    for path in [ROOT / "databricks.yml", *JOB_FILES]:
        for whl in _whl_paths(yaml.safe_load(path.read_text())):
            found += 1
            assert os.path.normpath(path.parent / whl) == str(ROOT / "dist" / "*.whl"), (path.name, whl)
    assert found > len(JOB_FILES)  # the cpu target's own job too


def test_targets():
    dev, prod = BUNDLE["targets"]["dev"], BUNDLE["targets"]["prod"]
    assert dev["mode"] == "development" and dev["default"] is True
    assert prod["mode"] == "production"
    assert prod["workspace"]["root_path"].startswith("/Workspace/")
    assert prod["run_as"] == {"service_principal_name": "${var.service_principal}"}
    assert any(p["level"] == "CAN_MANAGE" for p in prod["permissions"])
    for name, spec in BUNDLE["variables"].items():
        assert spec.get("description"), f"variable {name} has no description"
    assert variables("dev")["spark_version"] == "15.4.x-gpu-ml-scala2.12"


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: p.name)
def test_job_passes_the_bundle_model(path, target):
    from databricks.bundles.jobs import Job

    for job_key, job in jobs_of(path).items():
        model = Job.from_dict(resolved(target, job))
        assert model.name and model.tasks, job_key
        unresolved = re.findall(r"\$\{[^}]+\}", str(model.as_dict()))
        assert not unresolved, unresolved


def test_substitution_rejects_unknown_references():
    with pytest.raises(KeyError):
        resolved("dev", {"x": "${var.no_such_variable}"})
    job = {
        "parameters": [],
        "tasks": [{"task_key": "a", "python_wheel_task": {"parameters": ["{{job.parameters.nope}}"]}}],
    }
    with pytest.raises(KeyError):
        run_time_values(job, job["tasks"][0])


@pytest.mark.parametrize("item", wheel_tasks(), ids=task_id)
def test_wheel_task_entry_point_is_declared(item):
    wheel = item[3]["python_wheel_task"]
    assert wheel["package_name"] == "image_transfer"
    importlib.import_module(wheel["package_name"])
    if tomllib is None:
        pytest.skip("tomllib needs Python 3.11")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert wheel["entry_point"] in scripts
    module, _, attr = scripts[wheel["entry_point"]].partition(":")
    assert callable(getattr(importlib.import_module(module), attr))


@pytest.mark.parametrize("item", wheel_tasks(), ids=task_id)
def test_task_parameters_parse(item):
    _, _, job, task = item
    params = run_time_values(job, task)
    args = parse(params)
    assert args.command == params[0]
    assert callable(args.handler)


def test_registered_version_is_handed_from_train_to_evaluate_and_promoted():
    job = resolved("dev", jobs_of(ROOT / "resources" / "training.job.yml")["training"])
    tasks = {t["task_key"]: t for t in job["tasks"]}
    assert list(tasks) == ["prepare", "train", "evaluate"]
    assert upstream(job, "evaluate") == {"prepare", "train"}
    train = parse(run_time_values(job, tasks["train"]))
    assert train.register_as == "main.image_transfer_someone.image_classifier"
    assert "{{job.run_id}}" in tasks["train"]["python_wheel_task"]["parameters"][4]  # never the served model
    params = tasks["evaluate"]["python_wheel_task"]["parameters"]
    assert params[params.index("--model") + 1] == "{{tasks.train.values.model_uri}}"
    evaluate = parse(run_time_values(job, tasks["evaluate"]))
    assert evaluate.promote_to == "champion" and evaluate.min_accuracy == 0.5 and evaluate.tolerance == 0.01
    assert "schedule" not in job and "trigger" not in job  # on demand


def test_batch_inference_scores_the_champion():
    job = resolved("dev", jobs_of(ROOT / "resources" / "batch_inference.job.yml")["batch_inference"])
    score = next(t for t in job["tasks"] if t["task_key"] == "score")
    assert parse(run_time_values(job, score)).model == "models:/main.image_transfer_someone.image_classifier@champion"


def test_batch_inference_is_scheduled_and_guarded():
    job = resolved("dev", jobs_of(ROOT / "resources" / "batch_inference.job.yml")["batch_inference"])
    schedule = job["schedule"]
    assert len(schedule["quartz_cron_expression"].split()) in (6, 7)
    assert schedule["timezone_id"]
    assert schedule["pause_status"] == "PAUSED"
    prod = resolved("prod", jobs_of(ROOT / "resources" / "batch_inference.job.yml")["batch_inference"])
    assert prod["schedule"]["pause_status"] == "UNPAUSED"
    assert job["max_concurrent_runs"] == 1
    assert job["timeout_seconds"] > 0
    assert job["email_notifications"]["on_failure"] == ["someone@example.com"]
    assert [t["task_key"] for t in job["tasks"]][-1] == "score"
    assert all(t.get("max_retries", 0) > 0 for t in job["tasks"])


@pytest.mark.parametrize("target", TARGETS)
def test_job_clusters_are_set_up_for_gpu_scoring(target):
    for path in JOB_FILES:
        for job_key, job in jobs_of(path).items():
            job = resolved(target, job)
            batch_sizes = {
                parse(run_time_values(job, t)).batch_size
                for t in job["tasks"]
                if "python_wheel_task" in t and t["python_wheel_task"]["parameters"][0] in ("score", "featurize")
            }
            for cluster in job["job_clusters"]:
                spec, where = cluster["new_cluster"], f"{job_key}.{cluster['job_cluster_key']}"
                assert "-gpu-ml-" in spec["spark_version"], where
                assert spec["data_security_mode"] == "SINGLE_USER", where
                conf, env = spec["spark_conf"], spec["spark_env_vars"]
                # The Spark settings live in one place (image_transfer.runtime); the clusters mirror them.
                assert {k: conf.get(k) for k in SETTINGS} == SETTINGS, where
                assert env["TF_FORCE_GPU_ALLOW_GROWTH"] == "true", where
                assert env["TF_GPU_ALLOCATOR"] == "cuda_malloc_async", where
                arrow = int(conf["spark.sql.execution.arrow.maxRecordsPerBatch"])
                assert batch_sizes <= {arrow}, f"{where}: Arrow batch {arrow} vs --batch-size {batch_sizes}"
                if spec.get("num_workers", 1) > 0:  # GPU scheduling applies to multi-node clusters
                    amount = Fraction(str(conf["spark.task.resource.gpu.amount"]))
                    assert 0 < amount <= 1 and (1 / amount).denominator == 1, f"{where}: {amount} is not 1/n"


def _python_with_jsonschema() -> str | None:
    """An interpreter that has what validate_bundle.py needs (the venv may lack jsonschema)."""
    dirs = os.environ.get("PATH", "").split(os.pathsep)
    candidates = [sys.executable, *(shutil.which("python3", path=d) for d in dirs), "/usr/bin/python3"]
    for python in dict.fromkeys(c for c in candidates if c):
        check = subprocess.run([python, "-c", "import jsonschema, yaml"], capture_output=True, timeout=60)
        if check.returncode == 0:
            return python
    return None


def test_validate_bundle_tool():
    tool = SHARED / "tools" / "validate_bundle.py"
    if not tool.exists():
        pytest.skip(f"no {tool}")
    python = _python_with_jsonschema()
    if python is None:
        pytest.skip("no interpreter with PyYAML and jsonschema for validate_bundle.py")
    done = subprocess.run([python, str(tool), "."], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "validate_bundle: ok" in done.stdout


DOCS = ROOT / "docs" / "deploy.md"


def job_of(name: str, target: str = "dev", given: dict | None = None) -> dict:
    return resolved(target, jobs_of(ROOT / "resources" / f"{name}.job.yml")[name], given)


def test_deploy_docs_describe_every_job():
    text = DOCS.read_text()
    jobs = sorted(k for path in JOB_FILES for k in jobs_of(path))
    section = text.split("## The jobs", 1)[1].split("\n## ", 1)[0]
    assert {"four": 4}.get(re.search(r"creates (\w+) jobs", text).group(1)) == len(jobs) == 4
    for key in jobs:
        assert f"**{key}**" in section, f"docs/deploy.md, The jobs: no paragraph on {key}"
    assert "Both jobs" not in text


def test_the_notebook_job_scores_the_model_training_promotes():
    training = job_of("training")
    tasks = {t["task_key"]: t for t in training["tasks"]}
    registered = parse(run_time_values(training, tasks["train"])).register_as
    promoted = f"models:/{registered}@{parse(run_time_values(training, tasks['evaluate'])).promote_to}"
    notebook = job_of("score_and_featurize_notebook")
    defaults = {p["name"]: p["default"] for p in notebook["parameters"]}
    assert defaults["model"] == promoted == "models:/main.image_transfer_someone.image_classifier@champion"
    (cluster,) = notebook["job_clusters"]
    assert cluster["new_cluster"]["spark_env_vars"]["MLFLOW_REGISTRY_URI"] == "databricks-uc"
    # The widget's own default (an interactive run): the prod variables' champion.
    prod = {p["name"]: p["default"] for p in job_of("score_and_featurize_notebook", "prod")["parameters"]}
    widget = re.search(r'widget\("model", "([^"]+)"\)', (ROOT / "notebooks" / "score_and_featurize.py").read_text())
    assert widget.group(1) == prod["model"] == "models:/main.image_transfer.image_classifier@champion"


def test_prod_requires_an_address_for_failure_notifications():
    spec = BUNDLE["variables"]["notification_email"]
    assert "default" not in spec and spec.get("type") != "complex"  # --var can set it
    assert "notification_email" not in (BUNDLE["targets"]["prod"].get("variables") or {})
    with pytest.raises(KeyError, match="no value assigned to required variable notification_email"):
        variables("prod", given={})  # databricks bundle validate -t prod, without --var
    expected = {
        "dev": "someone@example.com",
        "dbr18": "someone@example.com",
        "cpu": "someone@example.com",
        "prod": "ml-oncall@example.com",
    }
    assert set(expected) == set(TARGETS)
    for target, address in expected.items():
        for path in JOB_FILES:
            for key, job in jobs_of(path).items():
                notify = resolved(target, job)["email_notifications"]
                assert notify["on_failure"] == [address], (target, key)
                assert all(v == [address] for v in notify.values()), (target, key)


def cloud(node_type: str) -> str:
    """The cloud a node type name belongs to."""
    return "azure" if node_type.startswith("Standard_") else "aws" if "." in node_type else "gcp"


GPU_FAMILY = re.compile(r"^(g4dn|g5|g6e?|p3|p4d|p5)\.|^Standard_N|^(g2|a2|a3)-")


@pytest.mark.parametrize("target", TARGETS)
def test_batch_inference_has_a_cpu_driver(target):
    (cluster,) = job_of("batch_inference", target)["job_clusters"]
    spec = cluster["new_cluster"]
    assert GPU_FAMILY.match(spec["node_type_id"]), spec["node_type_id"]
    assert not GPU_FAMILY.match(spec["driver_node_type_id"]), spec["driver_node_type_id"]
    assert cloud(spec["driver_node_type_id"]) == cloud(spec["node_type_id"])
    assert BUNDLE["variables"]["driver_node_type_id"]["default"] == "m5d.xlarge"
    (training,) = job_of("training", target)["job_clusters"]
    assert "driver_node_type_id" not in training["new_cluster"]  # single node: Keras fits on the GPU driver


def test_training_weights_are_a_variable_and_documented():
    raw = jobs_of(ROOT / "resources" / "training.job.yml")["training"]
    assert {"name": "weights", "default": "${var.backbone_weights}"} in raw["parameters"]
    train = next(t for t in job_of("training")["tasks"] if t["task_key"] == "train")
    params = train["python_wheel_task"]["parameters"]
    assert params[params.index("--weights") + 1] == "{{job.parameters.weights}}"
    assert parse(run_time_values(job_of("training"), train)).weights == "imagenet"
    volume_file = "/Volumes/main/s/v/weights/mobilenet_v2_no_top.h5"
    job = job_of("training", given={"backbone_weights": volume_file})
    assert parse(run_time_values(job, train)).weights == volume_file
    text = " ".join(DOCS.read_text().split())
    assert "outbound internet" in text and "--weights" in text and "backbone_weights" in text


# Databricks Runtime 18 LTS ML: the dbr18 target, as the CLI merges it.

KEYED_LISTS = {"tasks": "task_key", "job_clusters": "job_cluster_key"}


def _merge(base, override):
    """The CLI's merge of a target into the root: maps key by key, sequences appended, scalars replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            out[key] = _merge(base[key], value) if key in base else value
        return out
    if isinstance(base, list) and isinstance(override, list):
        return base + override
    return override if override is not None else base


def _combine_by_key(job: dict) -> dict:
    """Then tasks and job clusters of the same key become one (their libraries appended), in first-seen order."""
    job = dict(job)
    for field, key in KEYED_LISTS.items():
        combined: dict = {}
        for item in job.get(field, []):
            combined[item[key]] = _merge(combined[item[key]], item) if item[key] in combined else item
        if field in job:
            job[field] = list(combined.values())
    return job


def target_jobs(target: str) -> dict:
    """Every job ``databricks bundle deploy -t target`` creates: resources/ merged with the target's block,
    variables resolved."""
    jobs = {key: job for path in JOB_FILES for key, job in jobs_of(path).items()}
    overrides = ((BUNDLE["targets"][target] or {}).get("resources") or {}).get("jobs") or {}
    for key, override in overrides.items():
        if key in jobs:
            # An override naming no task of the job would add a task with no type: a broken bundle.
            tasks = {t["task_key"] for t in jobs[key]["tasks"]}
            added = {t["task_key"] for t in override.get("tasks", [])}
            assert added <= tasks, (target, key, added - tasks)
        jobs[key] = _merge(jobs.get(key), override)
    return {key: resolved(target, _combine_by_key(job)) for key, job in jobs.items()}


def ci_pins(name: str = "dbr18") -> dict[str, str]:
    """``.ci/NAME-requirements.in`` as {distribution: specifier}."""
    pins = {}
    for line in (ROOT / ".ci" / f"{name}-requirements.in").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*(.*)", line)
            pins[match.group(1).lower()] = match.group(3).replace(" ", "")
    return pins


DBR18 = variables("dbr18")
GPU_TF = [
    {"pypi": {"package": f"tensorflow[and-cuda]=={DBR18['tensorflow_version']}"}},
    {"pypi": {"package": f"keras=={DBR18['keras_version']}"}},
    {"pypi": {"package": DBR18["protobuf_requirement"]}},
]
CPU_TF = [
    {"pypi": {"package": f"tensorflow=={DBR18['tensorflow_version']}"}},
    {"pypi": {"package": f"keras=={DBR18['keras_version']}"}},
    {"pypi": {"package": DBR18["protobuf_requirement"]}},
    {"pypi": {"package": f"ai-edge-litert=={DBR18['litert_version']}"}},
]


def test_the_dbr18_pins_are_the_versions_ci_tests():
    """One definition of each version (the bundle variables), equal to CI's Runtime-18-like environment."""
    ci = ci_pins()
    # CI installs tensorflow-cpu (no CUDA libraries to download); the same version of the same package.
    assert ci["tensorflow-cpu"] == f"=={DBR18['tensorflow_version']}" == "==2.21.0"
    assert ci["keras"] == f"=={DBR18['keras_version']}"
    assert ci["ai-edge-litert"] == f"=={DBR18['litert_version']}"
    assert ci["protobuf"] == DBR18["protobuf_requirement"].removeprefix("protobuf")
    assert ci["mlflow-skinny"] == "==3.8.1"  # Runtime 18's, which needs protobuf < 7
    for name in ("tensorflow_version", "keras_version", "litert_version", "protobuf_requirement"):
        assert all(name not in (t or {}).get("variables", {}) for t in BUNDLE["targets"].values()), name
    # The wheel itself stays loose: it never replaces a runtime's own TensorFlow.
    if tomllib is not None:
        extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
        assert extras["tf"] == ["tensorflow>=2.16"]


def test_the_dbr18_job_clusters_use_runtime_18_and_the_right_node_types():
    jobs = target_jobs("dbr18")
    assert sorted(jobs) == sorted([*(k for p in JOB_FILES for k in jobs_of(p)), "batch_inference_cpu"])
    for key, job in jobs.items():
        for cluster in job["job_clusters"]:
            spec, where = cluster["new_cluster"], f"{key}.{cluster['job_cluster_key']}"
            nodes = [spec["node_type_id"], spec.get("driver_node_type_id", spec["node_type_id"])]
            if key == "batch_inference_cpu":
                assert spec["spark_version"] == "18.0.x-cpu-ml-scala2.13", where
                assert not any(GPU_FAMILY.match(n) for n in nodes), (where, nodes)
                assert nodes[0] == BUNDLE["variables"]["cpu_node_type_id"]["default"], where
            else:
                assert spec["spark_version"] == "18.0.x-gpu-ml-scala2.13", where
                assert GPU_FAMILY.match(spec["node_type_id"]), (where, nodes)
                assert spec["node_type_id"] == BUNDLE["variables"]["node_type_id"]["default"], where
            assert {cloud(n) for n in nodes} == {"aws"}, (where, nodes)


@pytest.mark.parametrize("target", TARGETS)
def test_gpu_scheduling_only_on_gpu_nodes(target):
    """Spark refuses spark.task.resource.gpu.amount on an executor without GPUs: the reason the GPU jobs
    cannot move to CPU nodes by a target override (an override cannot remove a key)."""
    for key, job in target_jobs(target).items():
        for cluster in job["job_clusters"]:
            spec = cluster["new_cluster"]
            if "spark.task.resource.gpu.amount" in spec["spark_conf"]:
                assert GPU_FAMILY.match(spec["node_type_id"]) and "-gpu-ml-" in spec["spark_version"], key
            if not GPU_FAMILY.match(spec["node_type_id"]):
                assert "-cpu-ml-" in spec["spark_version"], key
                assert not any(k.startswith("spark.task.resource.gpu") for k in spec["spark_conf"]), key


def test_every_dbr18_task_installs_the_wheel_and_the_pinned_tensorflow():
    for key, job in target_jobs("dbr18").items():
        for task in job["tasks"]:
            where, libraries = f"{key}.{task['task_key']}", task["libraries"]
            assert sum("whl" in lib for lib in libraries) == 1, where
            want = CPU_TF if key == "batch_inference_cpu" else GPU_TF
            assert [lib for lib in libraries if "pypi" in lib] == want, where
    # Runtimes that ship TensorFlow install none.
    for target in ("dev", "cpu", "prod"):
        assert "pypi" not in str(target_jobs(target)), target


def test_the_dbr18_cpu_job_is_the_cpu_targets_job():
    """batch_inference_cpu is defined once (a YAML anchor in the cpu target); dbr18 adds only libraries."""
    cpu, dbr18 = target_jobs("cpu")["batch_inference_cpu"], target_jobs("dbr18")["batch_inference_cpu"]
    (cpu_task,), (dbr18_task,) = cpu["tasks"], dbr18["tasks"]
    assert {k: v for k, v in dbr18_task.items() if k != "libraries"} == {
        k: v for k, v in cpu_task.items() if k != "libraries"
    }
    assert dbr18_task["libraries"] == cpu_task["libraries"] + CPU_TF
    strip = {"tasks", "job_clusters"}
    assert {k: v for k, v in dbr18.items() if k not in strip} == {k: v for k, v in cpu.items() if k not in strip}
    (cpu_cluster,), (dbr18_cluster,) = cpu["job_clusters"], dbr18["job_clusters"]
    assert cpu_cluster["new_cluster"]["spark_version"] == "15.4.x-cpu-ml-scala2.12"
    same = {"spark_version": "any"}
    assert {**dbr18_cluster["new_cluster"], **same} == {**cpu_cluster["new_cluster"], **same}
    args = parse(run_time_values(dbr18, dbr18_task))
    assert args.command == "score" and args.engine == "auto"


@pytest.mark.parametrize("target", ["dbr18", "cpu"])
def test_target_jobs_pass_the_bundle_model(target):
    from databricks.bundles.jobs import Job

    for key, job in target_jobs(target).items():
        model = Job.from_dict(job)
        assert model.name and model.tasks, key
        assert not re.findall(r"\$\{[^}]+\}", str(model.as_dict())), key


def test_deploy_docs_say_what_runs_on_gpu_on_runtime_18():
    for path in (DOCS, ROOT / "README.md"):
        text = " ".join(path.read_text().split())
        assert "-t dbr18" in text, path.name
        assert "issue 36" in text and "PyTorch engine" in text, path.name
    text = " ".join(DOCS.read_text().split())
    for phrase in ("tensorflow[and-cuda]==2.21.0", "untested on a GPU", "LiteRT", "CPU only", "19 ML"):
        assert phrase in text, phrase
