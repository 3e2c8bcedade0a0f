"""Promotion by alias: evaluate a candidate against the alias's current version, move the alias if good enough."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from image_transfer.errors import RunFailed, UserError, first_line
from image_transfer.models.uris import ResolvedModel, client, import_mlflow, resolve_model
from image_transfer.scoring.options import ScoringOptions


class PromotionRefused(RunFailed):
    """The evaluated version is not good enough for the alias: the alias stays where it was (exit 1)."""


# ---- promotion -------------------------------------------------------------------------------------


@dataclass
class Promotion:
    """The decision on moving ``alias`` to the evaluated version; ``to_dict`` goes into the evaluation JSON."""

    alias: str
    name: str
    candidate_version: str
    candidate_accuracy: float
    champion_version: str | None
    champion_accuracy: float | None
    min_accuracy: float
    tolerance: float
    promoted: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready decision."""
        return asdict(self)

    def describe(self) -> str:
        """One line: what happened and why."""
        verb = "promoted" if self.promoted else "not promoted"
        return f"{self.name}/{self.candidate_version} {verb} to @{self.alias}: {self.reason}"


def decide(
    candidate: float,
    champion: float | None,
    *,
    min_accuracy: float,
    tolerance: float,
    champion_version: str | None = None,
) -> tuple[bool, str]:
    """Whether a candidate with accuracy ``candidate`` may take the alias from one with ``champion``."""
    if candidate < min_accuracy:
        return False, f"validation accuracy {candidate:.4f} is below the minimum {min_accuracy:.4f}"
    if champion is not None and candidate < champion - tolerance:
        return False, (
            f"validation accuracy {candidate:.4f} is worse than the current version {champion_version}'s "
            f"{champion:.4f} by more than the tolerance {tolerance:.4f}"
        )
    if champion is None:
        return True, f"validation accuracy {candidate:.4f} >= {min_accuracy:.4f} and the alias was not set"
    return True, (
        f"validation accuracy {candidate:.4f} >= {min_accuracy:.4f} and not worse than the current version "
        f"{champion_version}'s {champion:.4f} by more than {tolerance:.4f}"
    )


def promote(
    spark: Any,
    df: Any,
    *,
    model: str,
    alias: str,
    min_accuracy: float = 0.0,
    tolerance: float = 0.0,
    split: str = "validation",
    metrics_path: str | None = None,
    options: ScoringOptions | None = None,
) -> tuple[Any, Promotion]:
    """Evaluate the registered version ``model`` and its alias's current version; move the alias if better.

    Writes the evaluation JSON (with ``promotion``) and logs the decision to the version's training run
    (or a new run). Returns (the candidate's ``EvaluationResult``, the ``Promotion``); when
    ``promotion.promoted`` is False the alias did not move (the CLI then exits 1 with the reason).
    The move is a compare-and-set: the alias is read again just before it is set, and if it moved while
    the versions were evaluated (another promotion, a hand move) it is not overwritten: the refusal
    names where it was and where it is now. (MLflow has no conditional alias update: what is left is
    the moment between that read and the set.)
    """
    from image_transfer.training.evaluate import evaluate

    if not alias or "/" in alias or "@" in alias:
        raise UserError(f"not an alias name: {alias!r}")
    if not 0.0 <= min_accuracy <= 1.0 or tolerance < 0.0:
        raise UserError(f"min accuracy must be in [0, 1] and tolerance >= 0, got {min_accuracy}, {tolerance}")
    resolved = resolve_model(model)
    if resolved.name is None:
        raise UserError(f"--promote-to needs a registered model (models:/NAME/VERSION or @ALIAS), got {model}")
    mlflow_client = client(resolved.name)
    current = _alias_version(mlflow_client, resolved.name, alias)
    candidate_uri = f"models:/{resolved.name}/{resolved.number}"
    result = evaluate(spark, df, model_path=candidate_uri, split=split, options=options)
    champion_version = current if current is not None and current != resolved.number else None
    champion_accuracy = (
        _champion_accuracy(spark, df, resolved, champion_version, alias=alias, split=split, options=options)
        if champion_version is not None
        else None
    )
    promoted, reason = decide(
        result.accuracy,
        champion_accuracy,
        min_accuracy=min_accuracy,
        tolerance=tolerance,
        champion_version=f"{resolved.name}/{champion_version}",
    )
    if current is not None and current == resolved.number and promoted:
        reason = f"already @{alias}; {reason}"
    if promoted:  # compare and set: the alias must still be where it was read, minutes of evaluation ago
        moved = _moved(mlflow_client, resolved, alias, current)
        if moved:
            promoted, reason = False, moved
    decision = Promotion(
        alias=alias,
        name=resolved.name,
        candidate_version=str(resolved.number),
        candidate_accuracy=result.accuracy,
        champion_version=champion_version,
        champion_accuracy=champion_accuracy,
        min_accuracy=min_accuracy,
        tolerance=tolerance,
        promoted=promoted,
        reason=reason,
    )
    if promoted:
        mlflow_client.set_registered_model_alias(resolved.name, alias, resolved.number)
    record = json.dumps({**result.to_dict(), "promotion": decision.to_dict()}, indent=2) + "\n"
    if metrics_path:
        Path(metrics_path).parent.mkdir(parents=True, exist_ok=True)
        Path(metrics_path).write_text(record)
    _log_decision(resolved, result, decision, split=split, record=record)
    return result, decision


def _champion_accuracy(
    spark: Any,
    df: Any,
    resolved: ResolvedModel,
    version: str,
    *,
    alias: str,
    split: str,
    options: ScoringOptions | None,
) -> float:
    """The accuracy of ``alias``'s current ``version`` on ``split``; a ``UserError`` when it cannot be evaluated."""
    from image_transfer.training.evaluate import evaluate

    try:
        champion = evaluate(spark, df, model_path=f"models:/{resolved.name}/{version}", split=split, options=options)
    except UserError as exc:  # e.g. the classes changed: no comparison, so no automatic promotion
        raise UserError(
            f"cannot evaluate the current @{alias} version {resolved.name}/{version} on the {split} "
            f"split ({exc}); the alias stays: set it by hand if {resolved.version} should replace it"
        ) from exc
    return champion.accuracy


def _moved(mlflow_client: Any, resolved: ResolvedModel, alias: str, current: str | None) -> str | None:
    """Why the alias is not set when it moved since ``current`` was read (to another version than the
    candidate); None when it is where it was."""
    now = _alias_version(mlflow_client, resolved.name, alias)
    if now == current or now == resolved.number:
        return None
    return (
        f"@{alias} moved from {_named(resolved.name, current)} to {_named(resolved.name, now)} while "
        f"{resolved.name}/{resolved.number} was evaluated: not overwritten; evaluate again to compare "
        f"with {_named(resolved.name, now)}"
    )


def _alias_version(mlflow_client: Any, name: str, alias: str) -> str | None:
    """The version number ``alias`` points to now, None when it is not set."""
    try:
        return str(mlflow_client.get_model_version_by_alias(name, alias).version)
    except Exception:  # noqa: BLE001 - the alias is not set (RESOURCE_DOES_NOT_EXIST / NOT_FOUND)
        return None


def _named(name: str, version: str | None) -> str:
    return f"{name}/{version}" if version is not None else "nowhere (unset)"


def _log_decision(resolved: ResolvedModel, result: Any, decision: Promotion, *, split: str, record: str) -> None:
    """The accuracies and the decision on the version's training run (a new run if it has none) and version."""
    mlflow = import_mlflow("logging the promotion")
    mlflow_client = client(resolved.name)
    try:
        run_id = resolved.run_id
        if run_id is None:  # registered from a file, not from a run: the decision gets a run of its own
            nested = mlflow.active_run() is not None
            with mlflow.start_run(run_name=f"evaluate {resolved.version}", nested=nested) as run:
                run_id = run.info.run_id
        prefix = f"promotion_{decision.alias}"
        mlflow_client.log_metric(run_id, f"evaluate_{split}_accuracy", result.accuracy)
        if decision.champion_accuracy is not None:
            mlflow_client.log_metric(run_id, f"{prefix}_champion_{split}_accuracy", decision.champion_accuracy)
        for key, value in {
            f"{prefix}_decision": "promoted" if decision.promoted else "refused",
            f"{prefix}_reason": decision.reason[:5000],
            f"{prefix}_champion_version": str(decision.champion_version or ""),
        }.items():
            mlflow_client.set_tag(run_id, key, value)
        mlflow_client.log_text(run_id, record, f"evaluate-{decision.alias}.json")
        accuracy = f"{result.accuracy:.6f}"
        mlflow_client.set_model_version_tag(resolved.name, resolved.number, f"{split}_accuracy", accuracy)
    except Exception as exc:  # noqa: BLE001 - the decision stands; the record is best effort
        print(f"warning: could not log the promotion to MLflow: {first_line(exc)}")
