"""Hostile inputs: results (see hostile.py for what every case must keep)."""

from __future__ import annotations

import torch

from hostile import ApiCase, CliCase
from sofim_tune import SOFIM, sofim
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
