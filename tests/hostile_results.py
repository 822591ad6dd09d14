"""Hostile inputs: results (see hostile.py for what every case must keep)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import torch

from hostile import ApiCase, CliCase
from sofim_tune import SOFIM, sofim
from sofim_tune.recommend import load_recommendation, optimizer_from_recommendation
from sofim_tune.optim import build_optimizer
from sofim_tune.trial import TrialConfig


def _train(*flags: str):
    return lambda scratch, run: ["train", "--dataset", "digits", "--device", "cpu", "--epochs", "1", *flags]


def _parameters() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(2))]


CLI_CASES: list[CliCase] = [
    CliCase("train-lr-inf", _train("--lr", "inf"), message="lr must be finite"),
    CliCase("train-lr-1e309", _train("--lr", "1e309"), message="lr must be finite"),
    CliCase("train-weight-decay-inf", _train("--weight-decay", "inf"), message="weight_decay must be finite"),
    CliCase("train-adamw-lr-minus-inf", _train("--optimizer", "adamw", "--lr", "-inf"), message="lr must be finite"),
]

API_CASES: list[ApiCase] = [
    ApiCase("sofim-lr-inf", lambda scratch: SOFIM(_parameters(), lr=float("inf")), "it must be finite"),
    ApiCase("sofim-tensor-lr-inf", lambda scratch: SOFIM(_parameters(), lr=torch.tensor(float("inf"))), "it must be finite"),
    ApiCase("sofim-rho-inf", lambda scratch: SOFIM(_parameters(), rho=float("inf")), "it must be finite"),
    ApiCase("sofim-group-weight-decay-inf", lambda scratch: SOFIM([{"params": _parameters(), "weight_decay": float("inf")}]), "it must be finite"),
    ApiCase(
        "sofim-functional-lr-inf",
        lambda scratch: sofim([torch.zeros(2)], [torch.ones(2)], [torch.zeros(2)], [torch.zeros(())], lr=float("inf"), rho=1.0, beta1=0.9),
        "it must be finite",
    ),
    ApiCase("trial-config-lr-inf", lambda scratch: TrialConfig(hyperparameters={"lr": float("inf"), "rho": 1.0, "beta1": 0.9}).validate(), "lr must be finite"),
    ApiCase("build-optimizer-sgd-lr-inf", lambda scratch: build_optimizer("sgd-momentum", _parameters(), {"lr": float("inf")}), "lr must be finite"),
    ApiCase("build-optimizer-adamw-weight-decay-inf", lambda scratch: build_optimizer("adamw", _parameters(), {"lr": 1e-3, "weight_decay": float("inf")}), "weight_decay must be finite"),
]


# --- best.json out of its domain, nested, huge or not a file ------------------------------


def _best_json(**changes: dict) -> dict:
    """A valid best.json document (from a synthetic study, no training), with tables updated by ``changes``."""
    from study_records import make_study

    from sofim_tune.recommend import build_recommendation

    data = build_recommendation(make_study(10)).to_dict()
    for table, values in changes.items():
        data[table] = {**data[table], **values}
    return data


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _lr_1e309() -> str:
    text = json.dumps(_best_json(hyperparameters={"lr": 12345.0}))
    return text.replace("12345.0", "1e309")


NESTED = "[" * 100000 + "]" * 100000


def _nested_in_fixed() -> str:
    """Deep enough to strain every recursive reader after the parser (the schema's validator, asdict, json.dumps)."""
    return json.dumps(_best_json(fixed={"x": "@@"})).replace('"@@"', "[" * 500 + "]" * 500)


def _load(name: str, text: str | None = None):
    """load_recommendation on ``name`` in the scratch folder, after writing ``text`` there when given."""

    def call(scratch: Path):
        if text is not None:
            _write(scratch / name, text)
        return load_recommendation(scratch / name)

    return call


for _id, _text, _message in [
    ("load-recommendation-negative-lr", lambda: json.dumps(_best_json(hyperparameters={"lr": -0.5})), "hyperparameters.lr must be > 0, got -0.5"),
    ("load-recommendation-rho-zero", lambda: json.dumps(_best_json(hyperparameters={"rho": 0})), "hyperparameters.rho must be > 0"),
    ("load-recommendation-beta1-above-one", lambda: json.dumps(_best_json(hyperparameters={"beta1": 1.5})), r"hyperparameters.beta1 must lie in \[0, 1\)"),
    ("load-recommendation-lr-1e309", _lr_1e309, "hyperparameters.lr must be finite"),
    ("load-recommendation-negative-fixed-weight-decay", lambda: json.dumps(_best_json(fixed={"weight_decay": -1.0})), "fixed.weight_decay must be >= 0"),
    ("load-recommendation-momentum-for-sofim", lambda: json.dumps(_best_json(hyperparameters={"momentum": 0.9})), "momentum"),
    ("load-recommendation-nested", lambda: NESTED, "nested too deeply"),
    ("load-recommendation-nested-in-fixed", _nested_in_fixed, "fixed/x: .* is not of type"),
    ("load-recommendation-huge", lambda: " " * (2 * 1024 * 1024) + "{}", "larger than 1 MiB"),
]:
    API_CASES.append(ApiCase(_id, lambda scratch, text=_text: _load("best.json", text())(scratch), _message))
API_CASES += [
    ApiCase("load-recommendation-dev-zero", lambda scratch: load_recommendation("/dev/zero"), "not a regular file"),
    ApiCase("load-recommendation-folder", lambda scratch: load_recommendation(scratch), "a folder, not a regular file"),
    ApiCase("load-recommendation-named-pipe", lambda scratch: load_recommendation(scratch / "pipe"), "not a regular file", setup=lambda scratch: os.mkfifo(scratch / "pipe")),
    ApiCase("load-recommendation-nul-in-path", lambda scratch: load_recommendation(f"{scratch}/best\0.json"), "not a valid path"),
    ApiCase(
        "optimizer-from-recommendation-mapping-negative-lr",
        lambda scratch: optimizer_from_recommendation(_parameters(), _best_json(hyperparameters={"lr": -0.5})),
        "hyperparameters.lr must be > 0",
    ),
    ApiCase(
        "optimizer-from-recommendation-mapping-nan-rho",
        lambda scratch: optimizer_from_recommendation(_parameters(), _best_json(hyperparameters={"rho": float("nan")})),
        "hyperparameters.rho must be finite",
    ),
]


def _results_with(bad_text: str):
    """A results folder holding the finished run's best.json and a second, bad one that claims the best metric."""

    def args(scratch: Path, run: Path | None) -> list[str]:
        _write(scratch / "results" / "good" / "best.json", (run / "best.json").read_text())
        _write(scratch / "results" / "bad" / "best.json", bad_text)
        return ["recommend", "--dataset", "digits", "--results", "results", "--json"]

    return args


def _recommends_the_good_one(scratch: Path, done: subprocess.CompletedProcess[str]) -> None:
    good = json.loads((scratch / "results" / "good" / "best.json").read_text())
    assert json.loads(done.stdout.strip().splitlines()[-1]) == good
    skipped = [line for line in done.stderr.splitlines() if line.startswith("skipped:")]
    assert len(skipped) == 1 and "bad/best.json" in skipped[0], done.stderr


def _edited(run_best: dict, **hyperparameters: float) -> str:
    """The run's best.json with ``hyperparameters`` changed and the best metric there can be, searched and confirmed."""
    metric = {**run_best["metric"], "value": 1.0, "confirm": {**run_best["metric"]["confirm"], "mean": 1.0}}
    return json.dumps({**run_best, "hyperparameters": {**run_best["hyperparameters"], **hyperparameters}, "metric": metric})


def _results_with_edited(**hyperparameters: float):
    def args(scratch: Path, run: Path | None) -> list[str]:
        return _results_with(_edited(json.loads((run / "best.json").read_text()), **hyperparameters))(scratch, run)

    return args


CLI_CASES += [
    CliCase("recommend-skips-a-negative-lr", _results_with_edited(lr=-0.5), exit_code=0, needs_run=True, check=_recommends_the_good_one),
    CliCase("recommend-skips-beta1-above-one", _results_with_edited(beta1=1.5), exit_code=0, needs_run=True, check=_recommends_the_good_one),
    CliCase("recommend-skips-a-nested-best-json", _results_with(NESTED), exit_code=0, needs_run=True, check=_recommends_the_good_one),
]
