"""The public API: one function for every step, typed and keyword-only, each option defined once."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

import image_transfer
from image_transfer import ScoringOptions, TrainConfig

# The outcome does not depend on library versions: CI runs this file in the default environment only.
pytestmark = pytest.mark.anyversion

STEPS = (
    "read_images",
    "read_input",
    "score_images",
    "featurize_images",
    "scoring_run",
    "write_scored",
    "write_output",
    "score_new_images",
    "featurize_new_images",
    "prepare_dataset",
    "dataset_rows",
    "train_model",
    "evaluate_model",
    "promote_model",
)


def test_every_step_is_exported_typed_and_keyword_only_after_its_data():
    for name in STEPS:
        assert name in image_transfer.__all__, name
        function = getattr(image_transfer, name)
        assert function.__doc__, f"{name} has no docstring"
        parameters = list(inspect.signature(function).parameters.values())
        assert "return" in function.__annotations__, f"{name} has no return type"
        for p in parameters:
            assert p.annotation is not inspect.Parameter.empty, f"{name}({p.name}) has no type"
            assert p.kind is not p.VAR_KEYWORD, f"{name} takes **{p.name}: give its keywords explicitly"
        # Only the data (a session, a DataFrame, a folder, a model) comes by position.
        positional = [p.name for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD]
        assert len(positional) <= 3, f"{name} takes {positional} by position"


def test_every_scoring_entry_point_takes_every_option_as_an_explicit_keyword_with_its_default():
    """One definition of each option: the API's explicit keywords are ScoringOptions' fields, defaults equal."""
    import dataclasses
    import inspect

    from image_transfer import featurize_images, featurize_new_images, score_images, score_new_images

    fields = {f.name: f.default for f in dataclasses.fields(ScoringOptions)}
    for function in (score_images, featurize_images, score_new_images, featurize_new_images):
        parameters = inspect.signature(function).parameters
        assert not any(p.kind is p.VAR_KEYWORD for p in parameters.values()), function.__name__
        for name, default in fields.items():
            assert name in parameters, f"{function.__name__} has no keyword {name}"
            assert parameters[name].kind is inspect.Parameter.KEYWORD_ONLY
            assert parameters[name].default == default, f"{function.__name__}({name}=...) differs from ScoringOptions"


def test_keywords_override_a_bundled_options_object_and_defaults_keep_its_values():
    base = ScoringOptions(batch_size=8, precision="bfloat16")
    merged = ScoringOptions.merged(base, {"batch_size": 64, "jit": True, "options": base, "top_k": 3})
    assert (merged.batch_size, merged.precision, merged.jit) == (8, "bfloat16", True)
    assert ScoringOptions.merged(None, {"batch_size": 16}).batch_size == 16


def test_train_model_takes_every_training_setting_as_a_keyword_with_its_default():
    parameters = inspect.signature(image_transfer.train_model).parameters
    for spec in dataclasses.fields(TrainConfig):
        assert spec.name in parameters, f"train_model has no keyword {spec.name}"
        assert parameters[spec.name].kind is inspect.Parameter.KEYWORD_ONLY
        assert parameters[spec.name].default == spec.default, f"train_model({spec.name}=...) differs from TrainConfig"


def test_the_package_exports_the_api_and_nothing_else():
    from image_transfer import api

    assert set(image_transfer.__all__) == {"__version__", *api.__all__}
