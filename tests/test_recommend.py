"""best.json: building, schema, atomic writing, loading, and the helpers behind it."""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
from pathlib import Path

import jsonschema
import pytest

from sofim_tune.errors import UserInputError
from sofim_tune.records import Confirmation, StudyRecord
from sofim_tune.recommend import (
    SCHEMA_ID,
    Recommendation,
    build_recommendation,
    good_region,
    load_recommendation,
    param_importances,
    write_recommendation,
)
from sofim_tune.files import redact_storage_url
from sofim_tune.selection import current_confirmations, pick_recommended
from study_records import make_study

HYPERPARAMETERS = {"lr", "rho", "beta1"}


@pytest.fixture(scope="module")
def study() -> StudyRecord:
    return make_study(40)


@pytest.fixture(scope="module")
def rec(study: StudyRecord) -> Recommendation:
    return build_recommendation(study, device="NVIDIA H100 80GB HBM3")


def _schema() -> dict:
    text = importlib.resources.files("sofim_tune").joinpath("recommendation.schema.json").read_text()
    return json.loads(text)


def _negated(study: StudyRecord) -> StudyRecord:
    """The same study as a minimization of -metric (negation is exact in floating point)."""
    trials = [dataclasses.replace(t, value=None if t.value is None else -t.value)
              for t in study.trials]
    return dataclasses.replace(study, trials=trials, direction="minimize", confirmations=[])


# --- schema and round trip -------------------------------------------------------------


def test_schema_is_valid_draft_2020_12() -> None:
    schema = _schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert "recommendation/v1" in schema["$id"]
    assert schema["properties"]["schema"] == {"const": SCHEMA_ID}
    assert schema["additionalProperties"] is False


def test_round_trip(tmp_path: Path, rec: Recommendation) -> None:
    path = write_recommendation(rec, tmp_path / "best.json")
    assert load_recommendation(path) == rec


def test_written_file_validates(tmp_path: Path, rec: Recommendation, study: StudyRecord) -> None:
    data = json.loads(write_recommendation(rec, tmp_path / "best.json").read_text())
    jsonschema.validate(data, _schema())
    assert data["schema"] == SCHEMA_ID
    assert set(data["hyperparameters"]) == HYPERPARAMETERS
    assert data["fixed"] == {"epochs": 10, "batch_size": 256, "weight_decay": 0.0}
    assert data["study"] | {"storage": None} == {
        "backend": "optuna", "name": "cifar100-resnet18", "storage": None, "trials": 40,
        "completed": len(study.by_state("complete")), "pruned": len(study.by_state("pruned")),
        "failed": 1, "sampler": "tpe", "pruner": "hyperband", "final": True, "widened": [],
    }
    assert data["provenance"]["device"] == "NVIDIA H100 80GB HBM3"
    assert data["provenance"]["created"].endswith("Z")
    assert {"sofim_tune", "torch", "optuna"} <= data["provenance"]["versions"].keys()


def test_design_example_loads() -> None:
    """The first release's best.json (the design's example plus ``study.final``) still loads
    and round-trips unchanged: the fields added since are optional."""
    example = {
        "schema": "sofim-tune/recommendation/v1",
        "dataset": "cifar100", "arch": "resnet18", "optimizer": "sofim",
        "hyperparameters": {"lr": 0.12, "rho": 0.5, "beta1": 0.9},
        "fixed": {"epochs": 30, "batch_size": 256, "weight_decay": 0.0},
        "metric": {"name": "val_accuracy", "direction": "maximize", "value": 0.712,
                   "confirm": {"seeds": [11, 12, 13], "mean": 0.709, "std": 0.003},
                   "test_accuracy": 0.701},
        "sensitivity": {"importance": {"lr": 0.55, "rho": 0.35, "beta1": 0.10},
                        "good_region": {"lr": [0.05, 0.4], "rho": [0.1, 2.0],
                                        "beta1": [0.8, 0.95]}},
        "study": {"backend": "optuna", "name": "cifar100-resnet18",
                  "storage": "sqlite:///runs/cifar100-resnet18/study.db", "trials": 64,
                  "completed": 21, "pruned": 40, "failed": 3, "sampler": "tpe",
                  "pruner": "hyperband", "final": True},
        "provenance": {"created": "2026-11-28T04:00:00Z", "device": "NVIDIA H100 80GB HBM3",
                       "versions": {"sofim_tune": "0.1.0", "torch": "2.14.1", "optuna": "5.0.0"}},
    }
    rec = Recommendation.from_dict(example)
    assert rec.sensitivity.good_region["lr"] == (0.05, 0.4)
    assert rec.metric.confirm is not None and rec.metric.confirm.seeds == [11, 12, 13]
    assert rec.to_dict() == example


# --- atomic writing ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "error", "expected"),
    [
        ("replace", OSError(28, "No space left on device"), UserInputError),
        ("fsync", OSError(5, "Input/output error"), UserInputError),
        ("fsync", KeyboardInterrupt(), KeyboardInterrupt),
    ],
)
def test_failed_write_keeps_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rec: Recommendation,
    target: str, error: BaseException, expected: type[BaseException],
) -> None:
    path = write_recommendation(rec, tmp_path / "best.json")
    before = path.read_bytes()

    def fail(*args: object) -> None:
        raise error

    monkeypatch.setattr(os, target, fail)
    with pytest.raises(expected):
        write_recommendation(dataclasses.replace(rec, dataset="imagenet"), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["best.json"]  # no temp file left


def test_write_creates_folder_and_rejects_unwritable_path(tmp_path: Path, rec: Recommendation) -> None:
    assert write_recommendation(rec, tmp_path / "runs" / "x" / "best.json").is_file()
    (tmp_path / "a-file").write_text("")
    with pytest.raises(UserInputError, match="cannot write"):
        write_recommendation(rec, tmp_path / "a-file" / "best.json")


def test_write_refuses_invalid_recommendation(tmp_path: Path, rec: Recommendation) -> None:
    broken = dataclasses.replace(rec, hyperparameters={})
    with pytest.raises(UserInputError, match="hyperparameters"):
        write_recommendation(broken, tmp_path / "best.json")
    assert not (tmp_path / "best.json").exists()


# --- loading errors ----------------------------------------------------------------------


def _break_schema_id(data: dict) -> None:
    data["schema"] = "sofim-tune/recommendation/v2"


def _drop_metric(data: dict) -> None:
    del data["metric"]


def _bad_type(data: dict) -> None:
    data["hyperparameters"]["lr"] = "fast"


def _extra_field(data: dict) -> None:
    data["comment"] = "hand-edited"


@pytest.mark.parametrize(
    ("corrupt", "what"),
    [
        (_break_schema_id, "schema is 'sofim-tune/recommendation/v2'"),
        (_drop_metric, "'metric' is a required property"),
        (_bad_type, "hyperparameters/lr: 'fast' is not of type 'number'"),
        (_extra_field, "'comment' was unexpected"),
    ],
)
def test_load_rejects_bad_documents(tmp_path: Path, rec: Recommendation, corrupt, what: str) -> None:
    data = rec.to_dict()
    corrupt(data)
    path = tmp_path / "best.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UserInputError) as info:
        load_recommendation(path)
    message = str(info.value)
    assert message.startswith(f"{path}: not a sofim-tune v1 recommendation: ")
    assert what in message
    assert "\n" not in message


def test_load_rejects_missing_and_corrupted_files(tmp_path: Path, rec: Recommendation) -> None:
    with pytest.raises(UserInputError, match="no such file"):
        load_recommendation(tmp_path / "nope.json")
    path = write_recommendation(rec, tmp_path / "best.json")
    path.write_text(path.read_text()[:100])  # truncated, as by a crash without atomic write
    with pytest.raises(UserInputError, match="invalid JSON at line"):
        load_recommendation(path)
    path.write_text("[1, 2]")
    with pytest.raises(UserInputError, match="top level: .* is not of type 'object'"):
        load_recommendation(path)


# --- sensitivity ---------------------------------------------------------------------------


def test_importance_shares(study: StudyRecord) -> None:
    shares = param_importances(study)
    assert set(shares) == HYPERPARAMETERS
    assert sum(shares.values()) == pytest.approx(1.0)
    assert all(0.0 <= v <= 1.0 for v in shares.values())
    assert param_importances(study) == shares  # reproducible


def test_importance_needs_two_completed_trials(study: StudyRecord) -> None:
    one = [study.best_trial()] + [t for t in study.trials if t.state != "complete"]
    assert param_importances(dataclasses.replace(study, trials=one)) == {}


def test_good_region(study: StudyRecord) -> None:
    best = study.best_trial()
    region = good_region(study)
    assert set(region) == HYPERPARAMETERS
    for name, (low, high) in region.items():
        assert low <= best.params[name] <= high
    assert good_region(study, tolerance=0.0) == {k: (v, v) for k, v in best.params.items()}
    wide = good_region(study, tolerance=1.0)  # every completed trial
    assert all(wide[k][0] <= region[k][0] and region[k][1] <= wide[k][1] for k in region)
    assert good_region(_negated(study)) == region  # direction respected
    with pytest.raises(UserInputError):
        good_region(study, tolerance=-0.1)


# --- confirmation and picking --------------------------------------------------------------


def test_recommendation_uses_confirmation(study: StudyRecord) -> None:
    second = sorted(study.by_state("complete"), key=lambda t: -t.value)[1]
    confirmation = Confirmation(params=dict(second.params), seeds=[7, 8], values=[0.8, 0.9],
                                test_accuracy=0.77)
    rec = build_recommendation(study, confirmations=[confirmation])
    assert rec.hyperparameters == second.params
    assert rec.metric.value == second.value  # its own search value, not the study's best
    assert rec.metric.confirm.seeds == [7, 8]
    assert rec.metric.confirm.mean == pytest.approx(0.85)
    # Sample standard deviation (n − 1), and the Student-t interval with 1 degree of freedom.
    assert rec.metric.confirm.std == pytest.approx(0.05 * 2 ** 0.5)
    assert rec.metric.confirm.ci95 == pytest.approx((0.85 - 12.7062 * 0.05, 0.85 + 12.7062 * 0.05), abs=1e-4)
    assert rec.metric.test_accuracy == 0.77
    assert build_recommendation(study, confirmations=[confirmation], test_accuracy=0.7).metric.test_accuracy == 0.7


def test_recommendation_without_confirmation(study: StudyRecord) -> None:
    rec = build_recommendation(study, confirmations=())
    assert rec.hyperparameters == study.best_trial().params
    assert rec.metric.value == study.best_trial().value
    assert rec.metric.confirm is None and rec.metric.test_accuracy is None
    assert pick_recommended(study, []) == (study.best_trial().params, None)


def test_defaults_to_study_confirmations(study: StudyRecord, rec: Recommendation) -> None:
    best_mean = max(study.confirmations, key=lambda c: c.mean)
    assert rec.hyperparameters == best_mean.params
    assert rec.metric.confirm.mean == pytest.approx(best_mean.mean)


def test_stale_confirmations_are_ignored_after_a_better_trial_joins(study: StudyRecord) -> None:
    """An extended study's old confirmations ranked other trials: export must not reuse them."""
    best = study.best_trial()
    better = dataclasses.replace(best, number=len(study.trials), params={**best.params, "lr": best.params["lr"] * 1.5}, value=best.value + 0.05)
    extended = dataclasses.replace(study, trials=[*study.trials, better])
    assert current_confirmations(study) == study.confirmations
    assert current_confirmations(extended) == []
    rec = build_recommendation(extended)
    assert rec.hyperparameters == better.params
    assert rec.metric.confirm is None


def test_running_study_is_not_final() -> None:
    rec = build_recommendation(make_study(12, running=2), confirmations=())
    assert rec.study.final is False
    assert rec.study.trials == 14


def test_no_completed_trial(study: StudyRecord) -> None:
    pending = dataclasses.replace(
        study, trials=[t for t in study.trials if t.state != "complete"], confirmations=[])
    with pytest.raises(UserInputError, match="study 'cifar100-resnet18' has no completed trial yet"):
        build_recommendation(pending)


# --- passwords ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("postgresql://user:secret@host/db", "postgresql://user:***@host/db"),
        ("postgresql+psycopg2://tuner:p@ss:w0rd@db.example:5432/optuna",
         "postgresql+psycopg2://tuner:***@db.example:5432/optuna"),
        ("redis://:secret@localhost:6379/0", "redis://:***@localhost:6379/0"),
        ("mysql://user@host/db?password=secret&ssl=1", "mysql://user@host/db?password=***&ssl=1"),
        ("postgresql://user@host/db", "postgresql://user@host/db"),
        ("sqlite:///runs/cifar100-resnet18/study.db", "sqlite:///runs/cifar100-resnet18/study.db"),
        ("journal:./runs/x/journal.log", "journal:./runs/x/journal.log"),
        ("http://[::1", "http://[::1"),  # malformed: returned as is, never raises
    ],
)
def test_redact_storage_url(url: str, redacted: str) -> None:
    assert redact_storage_url(url) == redacted


def test_password_never_written(tmp_path: Path) -> None:
    study = make_study(12, storage="postgresql://tuner:s3cr3t@db.example/optuna")
    path = write_recommendation(build_recommendation(study), tmp_path / "best.json")
    text = path.read_text()
    assert "s3cr3t" not in text
    assert "postgresql://tuner:***@db.example/optuna" in text


# --- domains: the schema, the loader and the optimizer agree -----------------------------------

DOMAIN_PROBES = [-float("inf"), -1.0, -1e-300, 0.0, 1e-300, 0.5, 0.999, 1.0, 1.5, 1e308, float("inf"), float("nan")]


@pytest.mark.parametrize("name", ["lr", "rho", "beta1", "beta2", "momentum", "weight_decay"])
def test_the_schema_states_the_optimizers_domain_of_each_hyperparameter(rec: Recommendation, name: str) -> None:
    from sofim_tune.optim import OPTIMIZER_HYPERPARAMETERS, hyperparameter_problem

    optimizer = next(o for o, takes in OPTIMIZER_HYPERPARAMETERS.items() if name in takes)
    validator = jsonschema.Draft202012Validator(_schema())
    for value in DOMAIN_PROBES:
        for table in ("hyperparameters", "fixed"):
            data = rec.to_dict() | {"optimizer": optimizer, "hyperparameters": {"lr": 0.1}}
            data[table] = data[table] | {name: value}
            schema_accepts = validator.is_valid(data)
            # NaN compares false with every bound, so JSON Schema cannot refuse it; JSON cannot hold it either.
            if value == value:
                assert schema_accepts == (hyperparameter_problem(name, value) is None), (table, name, value)
            if hyperparameter_problem(name, value) is not None:
                with pytest.raises(UserInputError, match=f"{table}.{name} must"):
                    Recommendation.from_dict(data)


def test_the_schema_names_each_optimizer_and_what_it_takes() -> None:
    from sofim_tune.optim import OPTIMIZER_HYPERPARAMETERS

    schema = _schema()
    assert schema["properties"]["optimizer"]["enum"] == list(OPTIMIZER_HYPERPARAMETERS)
    takes = {rule["if"]["properties"]["optimizer"]["const"]: rule["then"]["properties"]["hyperparameters"]["propertyNames"]["enum"] for rule in schema["allOf"]}
    assert takes == {name: list(names) for name, names in OPTIMIZER_HYPERPARAMETERS.items()}


@pytest.mark.parametrize(
    ("changes", "what"),
    [
        ({"hyperparameters": {"lr": -0.5, "rho": 1.0, "beta1": 0.9}}, "hyperparameters.lr must be > 0, got -0.5"),
        ({"hyperparameters": {"lr": 0.1, "rho": 0, "beta1": 0.9}}, "hyperparameters.rho must be > 0, got 0"),
        ({"hyperparameters": {"lr": 0.1, "rho": 1.0, "beta1": 1.5}}, "hyperparameters.beta1 must lie in [0, 1), got 1.5"),
        ({"hyperparameters": {"lr": 0.1, "momentum": 0.9}}, "hyperparameters: 'momentum' is not one of ['lr', 'rho', 'beta1', 'weight_decay']"),
        ({"optimizer": "lion"}, "optimizer: 'lion' is not one of"),
        ({"fixed": {"epochs": 0, "batch_size": 64}}, "fixed/epochs: 0 is less than the minimum of 1"),
        ({"fixed": {"epochs": 3, "batch_size": 64, "schedule": ["cosine"]}}, "fixed/schedule: ['cosine'] is not of type"),
    ],
)
def test_load_refuses_values_out_of_their_domain(tmp_path: Path, rec: Recommendation, changes: dict, what: str) -> None:
    path = tmp_path / "best.json"
    path.write_text(json.dumps(rec.to_dict() | changes))
    with pytest.raises(UserInputError) as info:
        load_recommendation(path)
    assert what in str(info.value)


def test_a_long_schema_message_keeps_its_end(tmp_path: Path, rec: Recommendation) -> None:
    data = rec.to_dict()
    data["fixed"]["x"] = [[[[["a" * 50] * 20]]]]
    path = tmp_path / "best.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UserInputError, match=r"fixed/x: .* … .* is not of type 'number', 'string', 'boolean', 'null'$"):
        load_recommendation(path)


# --- recommend: like with like ---------------------------------------------------------------


def _variant(rec: Recommendation, *, metric: str, search: float, confirmed: float | None, lr: float) -> dict:
    data = rec.to_dict()
    data["hyperparameters"]["lr"] = lr
    data["metric"] |= {"name": metric, "direction": "maximize" if metric == "val_accuracy" else "minimize", "value": search}
    data["metric"]["confirm"] = None if confirmed is None else data["metric"]["confirm"] | {"mean": confirmed}
    return data


@pytest.fixture()
def mixed_results(tmp_path: Path, rec: Recommendation) -> Path:
    """Confirmed and unconfirmed files of two metrics: a lucky unconfirmed search value tops every number."""
    variants = {
        "acc-a": dict(metric="val_accuracy", search=0.72, confirmed=0.70, lr=0.01),
        "acc-b": dict(metric="val_accuracy", search=0.60, confirmed=0.71, lr=0.02),
        "acc-lucky": dict(metric="val_accuracy", search=0.99, confirmed=None, lr=0.03),
        "loss-d": dict(metric="val_loss", search=0.25, confirmed=0.30, lr=0.04),
        "loss-e": dict(metric="val_loss", search=0.35, confirmed=0.20, lr=0.05),
    }
    for name, variant in variants.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "best.json").write_text(json.dumps(_variant(rec, **variant)))
    return tmp_path


def test_recommend_ranks_like_with_like(mixed_results: Path) -> None:
    from sofim_tune.runs import find_recommendations

    found = find_recommendations(mixed_results, "cifar100")
    assert [(r.basis, r.metric, [path.parent.name for path, _ in r.entries]) for r in found.rankings] == [
        ("confirmed", "val_accuracy", ["acc-b", "acc-a"]),
        ("confirmed", "val_loss", ["loss-e", "loss-d"]),
        ("search", "val_accuracy", ["acc-lucky"]),
    ]
    assert [r.describe() for r in found.rankings] == [
        "ranked by the confirmed mean (selection runs) of val_accuracy (higher is better)",
        "ranked by the confirmed mean (selection runs) of val_loss (lower is better)",
        "ranked by the search value (not confirmed) of val_accuracy (higher is better)",
    ]
    assert [found.rankings[0].value(rec) for _, rec in found.rankings[0].entries] == [0.71, 0.70]
    assert found.recommendations[0][0].parent.name == "acc-b"


def test_recommend_json_prints_the_top_of_the_first_ranking(mixed_results: Path) -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "sofim_tune.cli.app", "recommend", "--dataset", "cifar100", "--results", str(mixed_results), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["hyperparameters"]["lr"] == 0.02


# --- recommend: a compare folder whose files do not read --------------------------------------


@pytest.fixture(scope="module")
def compare_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A compare folder from a real tiny `compare` run (digits, SOFIM against SGD with momentum)."""
    from sofim_tune.spec import load_spec
    from sofim_tune.tuning import RunOptions, compare

    out = tmp_path_factory.mktemp("compare") / "digits"
    spec = load_spec("digits").replace(trials=2, epochs=1, confirm_top=1, confirm_seeds=2)
    return compare(spec, RunOptions(out_dir=out, device="cpu", workers=1), ("sofim", "sgd-momentum")).compare_json.parent


def _pick(folder: Path) -> str:
    """The optimizer the comparison in ``folder`` recommends: the best confirmed mean."""
    doc = json.loads((folder / "compare.json").read_text())
    return max(doc["optimizers"], key=lambda name: doc["optimizers"][name]["confirmed"]["mean"])


def _break_best_json(path: Path, how: str) -> None:
    if how == "missing":
        path.unlink()
    elif how == "out of its domain":
        path.write_text(json.dumps({**json.loads(path.read_text()), "hyperparameters": {"lr": -0.5}}))
    else:
        path.write_text({"invalid JSON": '{"schema": ', "nested": "[" * 100_000 + "]" * 100_000}[how])


@pytest.fixture()
def results_with_a_broken_comparison(tmp_path: Path, compare_folder: Path) -> Path:
    """Results holding a plain run folder, an older compare folder, and a newer one (the one
    `recommend` reads first) whose recommended optimizer's best.json is left to the test to break."""
    import shutil

    results = tmp_path / "results"
    shutil.copytree(compare_folder, results / "cmp-old")
    shutil.copytree(compare_folder, results / "cmp-new")
    older = results / "cmp-old" / "compare.json"
    older.write_text(json.dumps({**json.loads(older.read_text()), "created": "2000-01-01T00:00:00Z"}))
    (results / "plain").mkdir()
    shutil.copy(compare_folder / "sgd-momentum" / "best.json", results / "plain" / "best.json")
    return results


@pytest.mark.parametrize("how", ["invalid JSON", "nested", "missing", "out of its domain"])
def test_recommend_skips_a_compare_folder_whose_recommendation_does_not_read(results_with_a_broken_comparison: Path, how: str) -> None:
    from typer.testing import CliRunner

    from sofim_tune.cli.app import app
    from sofim_tune.runs import find_recommendations

    results = results_with_a_broken_comparison
    pick = _pick(results / "cmp-new")
    _break_best_json(results / "cmp-new" / pick / "best.json", how)

    done = CliRunner().invoke(app, ["recommend", "--dataset", "digits", "--results", str(results)])
    assert done.exit_code == 0, done.output
    skipped = [line for line in done.stderr.splitlines() if line.startswith("skipped:")]
    assert len(skipped) == 1 and f"cmp-new/{pick}/best.json" in skipped[0] and "cmp-new/compare.json" in skipped[0], done.stderr
    # The listing goes on: the older comparison picks the optimizer, and the plain run folder is listed.
    assert done.stdout.startswith(f"use {pick} (") and str(results / "cmp-old") in done.stdout, done.stdout
    assert "recommended settings for digits" in done.stdout, done.stdout
    found = find_recommendations(results, "digits")
    assert found.choice is not None and found.choice.folder == results / "cmp-old"
    assert [path.parent.name for path, _ in found.recommendations] == ["plain"]

    as_json = CliRunner().invoke(app, ["recommend", "--dataset", "digits", "--results", str(results), "--json"])
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.stdout) == json.loads((results / "cmp-old" / pick / "best.json").read_text())


def test_recommend_lists_the_run_folders_when_no_comparison_reads(results_with_a_broken_comparison: Path) -> None:
    from sofim_tune.runs import find_recommendations

    results = results_with_a_broken_comparison
    (results / "cmp-old" / "compare.json").write_text("[" * 100_000 + "]" * 100_000)
    _break_best_json(results / "cmp-new" / _pick(results / "cmp-new") / "best.json", "invalid JSON")

    found = find_recommendations(results, "digits")
    assert found.choice is None
    assert [path.parent.name for path, _ in found.recommendations] == ["plain"]
    assert len(found.invalid) == 2 and any("cmp-old/compare.json" in line and "nested too deeply" in line for line in found.invalid)


def test_recommend_skips_a_comparison_whose_run_dir_is_no_path(results_with_a_broken_comparison: Path) -> None:
    from sofim_tune.runs import find_recommendations

    results = results_with_a_broken_comparison
    newer = results / "cmp-new" / "compare.json"
    doc = json.loads(newer.read_text())
    newer.write_text(json.dumps({**doc, "optimizers": {name: {**entry, "run_dir": "a\0b"} for name, entry in doc["optimizers"].items()}}))

    found = find_recommendations(results, "digits")
    assert found.choice is not None and found.choice.folder == results / "cmp-old"
    assert len(found.invalid) == 1 and "not a valid path" in found.invalid[0] and "cmp-new/compare.json" in found.invalid[0]
