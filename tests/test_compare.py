"""`sofim-tune compare`: equal budgets, resume, compare.json, recommend choosing the optimizer."""

from __future__ import annotations

import json
import shutil

import optuna
import pytest
from typer.testing import CliRunner

from sofim_tune.backends import optuna as optuna_backend
from sofim_tune.cli.app import app
from sofim_tune.comparison import load_comparison
from sofim_tune.spec import load_spec
from sofim_tune.tuning import RunOptions, compare, compare_plans, tune

TINY = dict(trials=3, epochs=2, confirm_top=1, confirm_seeds=2, final_runs=2)
OPTIMIZERS = ("sofim", "sgd-momentum")


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "digits"
    return compare(load_spec("digits").replace(**TINY), RunOptions(out_dir=out, device="cpu"), OPTIMIZERS)


def stored_metadata(run_dir):
    study_name = json.loads((run_dir / "run.json").read_text())["study"]
    study = optuna.load_study(study_name=study_name, storage=optuna_backend.open_storage(f"sqlite:///{run_dir / 'study.db'}"))
    return study, study.user_attrs["sofim_tune"]


def test_every_optimizer_gets_the_same_budget(compared):
    out = compared.compare_json.parent
    metas = {name: stored_metadata(out / name)[1] for name in OPTIMIZERS}
    shared = ("trials", "epochs", "batch_size", "sampler", "pruner", "seed", "split_seed", "val_fraction", "dataset", "arch", "metric")
    for key in shared:
        assert len({json.dumps(meta[key]) for meta in metas.values()}) == 1, key
    assert metas["sofim"]["optimizer"] == "sofim" and metas["sgd-momentum"]["optimizer"] == "sgd-momentum"
    recipes = {name: {k: v for k, v in meta["recipe"].items() if k != "decoupled_weight_decay"} for name, meta in metas.items()}
    assert recipes["sofim"] == recipes["sgd-momentum"]
    confirmations = {name: stored_metadata(out / name)[0].user_attrs["confirmations"][0] for name in OPTIMIZERS}
    assert confirmations["sofim"]["seeds"] == confirmations["sgd-momentum"]["seeds"]
    assert confirmations["sofim"]["split_seeds"] == confirmations["sgd-momentum"]["split_seeds"]
    # The final runs, which the verdicts pair, share their seeds and final images too.
    finals = {name: stored_metadata(out / name)[0].user_attrs["confirmations"][-1] for name in OPTIMIZERS}
    assert all(final["final"] for final in finals.values())
    assert finals["sofim"]["seeds"] == finals["sgd-momentum"]["seeds"] and finals["sofim"]["final_seed"] == finals["sgd-momentum"]["final_seed"]


def test_compare_json_describes_every_optimizer(compared):
    doc = load_comparison(compared.compare_json)
    assert set(doc["optimizers"]) == set(OPTIMIZERS)
    for name, entry in doc["optimizers"].items():
        rec = json.loads((compared.compare_json.parent / entry["run_dir"] / "best.json").read_text())
        assert entry["hyperparameters"] == rec["hyperparameters"]
        assert len(entry["confirmed"]["values"]) == 2
        assert entry["tuning"]["epochs"] > 0
    assert [(v["optimizer"], v["against"]) for v in doc["verdicts"]] == [("sofim", "sgd-momentum")]
    assert compared.compare_html.is_file()


def test_each_optimizer_folder_is_a_run_folder(compared):
    for name in OPTIMIZERS:
        shown = invoke("show", compared.compare_json.parent / name)
        assert shown.exit_code == 0 and "3 of 3" in shown.stdout, shown.output


def test_a_half_finished_compare_resumes(tmp_path):
    spec, options = load_spec("digits").replace(**TINY), RunOptions(out_dir=tmp_path / "cmp", device="cpu")
    # As if compare had been stopped after its first study.
    first_spec, first_options = compare_plans(spec, options, OPTIMIZERS)["sofim"]
    first = tune(first_spec, first_options)
    outcome = compare(spec, options, OPTIMIZERS)
    assert [t.number for t in outcome.studies["sofim"].study.trials] == [t.number for t in first.study.trials]
    assert outcome.studies["sofim"].study.confirmations == first.study.confirmations  # nothing retrained
    assert len(outcome.studies["sgd-momentum"].study.trials) == 3


def test_recommend_picks_the_optimizer(compared):
    results = compared.compare_json.parent.parent
    done = invoke("recommend", "--dataset", "digits", "--results", results)
    assert done.exit_code == 0, done.output
    doc = load_comparison(compared.compare_json)
    best = max(doc["optimizers"], key=lambda name: doc["optimizers"][name]["confirmed"]["mean"])
    assert done.stdout.startswith(f"use {best} (")
    as_json = json.loads(invoke("recommend", "--dataset", "digits", "--results", results, "--json").stdout)
    assert as_json["optimizer"] == best


def test_a_corrupted_compare_json_is_refused(compared, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(compared.compare_json.parent, copy)
    (copy / "compare.json").write_text(json.dumps({**json.loads(compared.compare_json.read_text()), "schema": "sofim-tune/comparison/v9"}))
    done = invoke("compare-summary", copy, "-o", tmp_path / "summary")
    assert done.exit_code == 2 and len(done.stderr.strip().splitlines()) == 1 and "comparison" in done.stderr
    assert not (tmp_path / "summary").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--optimizers", "sofim,lbfgs"], "lbfgs"),
        (["--optimizers", "sgd-momentum,adamw"], "needs sofim"),
        (["--optimizers", "sofim"], "two or more"),
    ],
)
def test_bad_compare_input_is_one_line_exit_2_and_writes_nothing(args, message, tmp_path):
    done = invoke("compare", "--dataset", "digits", "--device", "cpu", "--out", tmp_path / "cmp", *args)
    assert done.exit_code == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "cmp").exists()


def test_a_log_without_a_terminal_follows_every_study(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "sofim_tune.cli.app", "compare", "--dataset", "digits", "--device", "cpu", "--trials", "2", "--epochs", "1",
                           "--confirm-top", "1", "--confirm-seeds", "2", "--out", str(tmp_path / "cmp")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    # A trial's line ("NAME trial N complete ..."), not the status line a slow study adds every
    # 30 s ("NAME: 1 running · ... no completed trial yet").
    studies = [line.split()[0] for line in done.stderr.splitlines() if line.split()[1:2] == ["trial"]]
    assert studies == ["digits-mlp-sofim"] * 2 + ["digits-mlp-sgd-momentum"] * 2 + ["digits-mlp-adamw"] * 2
    assert "better than" in done.stdout or "worse than" in done.stdout or "indistinguishable from" in done.stdout


def test_a_folder_of_other_files_is_refused(tmp_path):
    (tmp_path / "cmp").mkdir()
    (tmp_path / "cmp" / "notes.txt").write_text("mine")
    done = invoke("compare", "--dataset", "digits", "--device", "cpu", "--out", tmp_path / "cmp")
    assert done.exit_code == 2 and "notes.txt" in done.stderr
    assert [p.name for p in (tmp_path / "cmp").iterdir()] == ["notes.txt"]


def test_tuning_seconds_count_overlapping_trials_once(tmp_path):
    """A batched study's members train side by side: its tuning time is the wall-clock time its
    trials ran, not the sum of every member's time (about K times more for a batch of K)."""
    from itertools import combinations

    from sofim_tune.tuning import optimizer_result

    spec = load_spec("digits").replace(trials=4, epochs=2, confirm_top=1, confirm_seeds=2)
    outcome = tune(spec, RunOptions(out_dir=tmp_path / "run", device="cpu", workers=1, batch_trials=2))
    spans = [(t.started, t.finished) for t in outcome.study.trials]
    assert any(a[0] < b[1] and b[0] < a[1] for a, b in combinations(spans, 2)), spans  # the members overlap
    seconds = optimizer_result("sofim", outcome).tuning_seconds
    assert 0 < seconds <= (max(end for _, end in spans) - min(start for start, _ in spans)).total_seconds()
    assert seconds < sum(float(t.attrs["seconds"]) for t in outcome.study.trials)


def test_compare_json_says_its_seconds_are_wall_clock(compared):
    doc = load_comparison(compared.compare_json)
    assert {entry["tuning"]["seconds_are"] for entry in doc["optimizers"].values()} == {"wall"}
    assert "tuning wall seconds" in compared.compare_html.read_text()
