"""export, plot, show and recommend: reading run folders after (or during) a study."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

from sofim_tune.backends import optuna as optuna_backend
from sofim_tune.cli.app import app
from sofim_tune.recommend import SCHEMA_ID, load_recommendation
from sofim_tune.space import load_space
from sofim_tune.spec import load_spec
from sofim_tune.tuning import RunOptions, tune

runner = CliRunner()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """A results root with one finished digits run."""
    root = tmp_path_factory.mktemp("results")
    spec = load_spec("digits").replace(trials=4, epochs=2, confirm_top=1, confirm_seeds=2)
    tune(spec, RunOptions(out_dir=root / "digits-mlp", device="cpu"))
    return root


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def one_line_exit_2(done, message: str, code: int = 2) -> None:
    lines = done.stderr.strip().splitlines()
    assert done.exit_code == code, done.output
    assert len(lines) == 1 and message in lines[0], done.stderr


def test_export_in_a_subprocess_writes_v1(results, tmp_path):
    target = tmp_path / "out.json"
    done = subprocess.run([sys.executable, "-m", "sofim_tune.cli.app", "export", str(results / "digits-mlp"), "-o", str(target)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    data = json.loads(target.read_text())
    assert data["schema"] == SCHEMA_ID and data["study"]["final"] is True
    assert data["metric"]["confirm"]["seeds"] and len(data["metric"]["confirm"]["seeds"]) == 2
    assert data["metric"]["test_accuracy"] is not None


def test_export_from_storage_of_a_running_study_says_best_so_far(results, tmp_path):
    db = tmp_path / "copy.db"
    shutil.copy(results / "digits-mlp" / "study.db", db)
    study = optuna.load_study(study_name="digits-mlp", storage=f"sqlite:///{db}")
    study.set_user_attr("sofim_tune", {**study.user_attrs["sofim_tune"], "trials": 10})
    done = invoke("export", "--storage", f"sqlite:///{db}", "-o", tmp_path / "partial.json")
    assert done.exit_code == 0, done.output
    assert "best so far" in done.stdout
    assert load_recommendation(tmp_path / "partial.json").study.final is False


def test_plot_writes_the_report(results, tmp_path):
    done = invoke("plot", results / "digits-mlp", "-o", tmp_path)
    assert done.exit_code == 0, done.output
    html = (tmp_path / "report.html").read_text()
    assert "lr/rho" in html and (tmp_path / "plots").is_dir()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="PNG export needs Debian's chromium (.ci/run installs it)")
def test_plot_png(results, tmp_path):
    done = invoke("plot", results / "digits-mlp", "-o", tmp_path, "--png")
    assert done.exit_code == 0, done.output
    pngs = list((tmp_path / "plots").glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    # It says which files it wrote: every PNG, one line each.
    assert {line.removeprefix("wrote ") for line in done.stdout.splitlines() if line.endswith(".png")} == {str(p) for p in pngs}


def test_show(results):
    done = invoke("show", results / "digits-mlp")
    assert done.exit_code == 0, done.output
    assert "4 of 4" in done.stdout and "best so far" in done.stdout


def test_recommend_table_and_json(results):
    table = invoke("recommend", "--dataset", "digits", "--results", results)
    assert table.exit_code == 0 and "mlp" in table.stdout
    as_json = invoke("recommend", "--dataset", "digits", "--arch", "mlp", "--results", results, "--json")
    assert json.loads(as_json.stdout)["dataset"] == "digits"


def test_recommend_without_a_run_says_how_to_make_one(results):
    # Nothing found is not bad input: exit 1, as grep without a match.
    one_line_exit_2(invoke("recommend", "--dataset", "cifar100", "--arch", "resnet18", "--results", results), "sofim-tune run --dataset cifar100 --arch resnet18", code=1)


def test_recommend_names_the_invalid_files_it_skips(results, tmp_path):
    root = tmp_path / "results"
    shutil.copytree(results / "digits-mlp", root / "good")
    (root / "broken").mkdir()
    (root / "broken" / "best.json").write_text("{not json")
    (root / "old").mkdir()
    (root / "old" / "best.json").write_text(json.dumps({"schema": "sofim-tune/recommendation/v0"}))
    done = invoke("recommend", "--dataset", "digits", "--results", root, "--json")
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["dataset"] == "digits"
    skipped = [line for line in done.stderr.splitlines() if line.startswith("skipped:")]
    assert len(skipped) == 2
    assert any("broken/best.json" in line and "invalid JSON" in line for line in skipped)
    assert any("old/best.json" in line and "v0" in line for line in skipped)


def test_a_copied_run_folder_is_its_own(results, tmp_path):
    """run.json names the default storage relative to the folder: a copy reads itself, even
    when the original is gone, and a rerun on the copy resumes the copy."""
    original = tmp_path / "original"
    shutil.copytree(results / "digits-mlp", original)
    assert json.loads((original / "run.json").read_text())["storage"] == "study.db"
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(original, copy)
    shutil.rmtree(original)
    shown = invoke("show", copy)
    assert shown.exit_code == 0, shown.output
    assert "4 of 4" in shown.stdout
    spec = load_spec("digits").replace(trials=5, epochs=2, confirm_top=1, confirm_seeds=2)
    outcome = tune(spec, RunOptions(out_dir=copy, device="cpu"))
    assert len(outcome.study.by_state("complete")) + len(outcome.study.by_state("pruned")) == 5
    assert not original.exists()


def test_folder_without_a_study(tmp_path):
    one_line_exit_2(invoke("show", tmp_path), "holds no sofim-tune study")


def test_study_without_completed_trial(tmp_path):
    spec = load_spec("digits").replace(trials=2)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    optuna_backend.open_study(spec, load_space("sofim"), url)
    one_line_exit_2(invoke("export", "--storage", url, "-o", tmp_path / "best.json"), "no completed trial", code=1)
    assert not (tmp_path / "best.json").exists()


def test_unwritable_output(results, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    one_line_exit_2(invoke("export", results / "digits-mlp", "-o", blocker / "best.json"), "best.json")


def test_optimizer_from_recommendation(results):
    import torch

    from sofim_tune.recommend import optimizer_from_recommendation

    rec = load_recommendation(results / "digits-mlp" / "best.json")
    opt = optimizer_from_recommendation(torch.nn.Linear(2, 2).parameters(), rec)
    assert opt.param_groups[0]["lr"] == rec.hyperparameters["lr"] and opt.param_groups[0]["rho"] == rec.hyperparameters["rho"]
    assert optimizer_from_recommendation(torch.nn.Linear(2, 2).parameters(), results / "digits-mlp" / "best.json").defaults["beta1"] == rec.hyperparameters["beta1"]


def test_a_log_without_a_terminal_hears_from_a_long_trial(monkeypatch, capsys):
    """The quiet line runs on a clock: a trial of minutes reports no progress of its own."""
    import time

    from sofim_tune.cli import app as cli_app
    from study_records import make_study

    monkeypatch.setattr(cli_app._LiveView, "QUIET_SECONDS", 0.5)
    view = cli_app._LiveView()
    view.terminal = False
    with view:
        view(make_study(6, running=1))
        time.sleep(1.8)
    quiet = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cifar100-resnet18: 1 running")]
    assert len(quiet) >= 2 and all("finished" in line for line in quiet)


def test_storage_names_round_trip_through_run_json(tmp_path):
    """A file storage inside the run folder is named relative to it, and keeps its kind."""
    from sofim_tune.study import run_file_storage, storage_from_run_file

    out = tmp_path / "run"
    for url, relative in (
        (f"journal:{out / 'study.jnl'}", "journal:study.jnl"),
        (f"sqlite:///{out / 'my.log'}", "my.log"),
        (f"journal:{tmp_path / 'elsewhere.log'}", None),
        (f"sqlite:///{tmp_path / 'x.db'}", None),
    ):
        stored = run_file_storage(url, out)
        assert stored == (relative or url)
        assert storage_from_run_file(stored, out) == url
    assert run_file_storage("postgresql://u:pw@h/db", out) == "postgresql://u:***@h/db"


def test_recommend_ranks_by_the_confirmed_mean(results, tmp_path):
    """A lucky search value must not outrank a better confirmed mean."""
    root = tmp_path / "results"
    for name, (search, confirmed) in {"lucky": (0.99, 0.90), "solid": (0.95, 0.94)}.items():
        (root / name).mkdir(parents=True)
        data = json.loads((results / "digits-mlp" / "best.json").read_text())
        data["metric"]["value"], data["metric"]["confirm"]["mean"] = search, confirmed
        data["hyperparameters"]["lr"] = {"lucky": 0.5, "solid": 0.05}[name]
        (root / name / "best.json").write_text(json.dumps(data))
    done = invoke("recommend", "--dataset", "digits", "--results", root, "--json")
    assert json.loads(done.stdout)["hyperparameters"]["lr"] == 0.05


def cli(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sofim_tune.cli.app", *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_export_and_plot_replace_their_own_files_and_a_users_only_with_force(results, tmp_path):
    """One rule for every command that writes: its own files are replaced; any other file of
    the same name only with --force (the refusals are cases of tests/hostile_cli.py)."""
    run = results / "digits-mlp"
    mine = tmp_path / "best.json"
    mine.write_text('{"mine": true}\n')
    assert cli("export", run, "-o", mine).returncode == 2 and mine.read_text() == '{"mine": true}\n'
    forced = cli("export", run, "-o", mine, "--force")
    assert forced.returncode == 0, forced.stderr
    assert load_recommendation(mine).dataset == "digits"
    again = cli("export", run, "-o", mine)  # now sofim-tune's own file
    assert again.returncode == 0, again.stderr

    site = tmp_path / "site"
    site.mkdir()
    (site / "report.html").write_text("<html>my page</html>\n")
    refused = cli("plot", run, "-o", site)
    assert refused.returncode == 2 and "--force" in refused.stderr
    assert (site / "report.html").read_text() == "<html>my page</html>\n" and not (site / "plots").exists()
    forced = cli("plot", run, "-o", site, "--force")
    assert forced.returncode == 0, forced.stderr
    again = cli("plot", run, "-o", site)  # every file there is sofim-tune's now
    assert again.returncode == 0, again.stderr
    assert "sofim-tune report" in (site / "report.html").read_text()


def test_version_prints_the_installed_version_and_exits_0():
    import importlib.metadata

    done = subprocess.run([sys.executable, "-m", "sofim_tune.cli.app", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"sofim-tune {importlib.metadata.version('sofim-tune')}" and done.stderr == ""
    import sofim_tune

    assert importlib.metadata.version("sofim-tune") == sofim_tune.__version__


def test_runs_options_are_grouped_in_help_panels():
    done = subprocess.run([sys.executable, "-m", "sofim_tune.cli.app", "run", "--help"], capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    panels, current = {}, None
    for line in done.stdout.splitlines():
        if line.startswith("╭─ "):
            current = line.removeprefix("╭─ ").split(" ─")[0]
        elif line.startswith("│ --") and current is not None:
            panels.setdefault(current, []).append(line.split()[1])
    assert set(panels) == {"Options", "Data", "Budget", "Search", "Parallelism", "Training recipe", "Ray"}
    assert {"--trials", "--epochs", "--confirm-top", "--confirm-seeds", "--timeout"} <= set(panels["Budget"])
    assert {"--sampler", "--pruner", "--space", "--widen"} <= set(panels["Search"]) and {"--workers", "--lookahead", "--gpus"} <= set(panels["Parallelism"])
    assert {"--backend", "--address", "--max-concurrent"} <= set(panels["Ray"]) and {"--schedule", "--augment"} <= set(panels["Training recipe"])
    assert sum(map(len, panels.values())) >= 36  # every option in one panel or another, none lost


def test_run_keeps_its_study_where_sofim_tune_storage_says(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    env = {**os.environ, "SOFIM_TUNE_STORAGE": url, "MINE": f"sqlite:///{tmp_path / 'mine.db'}"}
    done = subprocess.run([sys.executable, "-m", "sofim_tune.cli.app", "run", "--dataset", "digits", "--trials", "2", "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "run" / "run.json").read_text())["storage"] == url
    assert len(optuna.load_study(study_name="digits-mlp", storage=url).trials) == 2
    # --storage-env names another variable: it wins over SOFIM_TUNE_STORAGE, with no complaint.
    done = subprocess.run([sys.executable, "-m", "sofim_tune.cli.app", "run", "--dataset", "digits", "--trials", "2", "--epochs", "1", "--device", "cpu", "--storage-env", "MINE", "--out", str(tmp_path / "other")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "mine.db").is_file()


def test_recommend_without_a_recommendation_exits_1_with_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "sofim_tune.cli.app", "recommend", "--dataset", "digits", "--results", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and "no recommendation for digits" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("command", ["run", "compare"])
def test_missing_data_names_download_on_the_command_that_was_run(tmp_path, command):
    done = subprocess.run([sys.executable, "-m", "sofim_tune.cli.app", command, "--dataset", "mnist", "--data-dir", str(tmp_path / "data"), "--trials", "1", "--epochs", "1", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "run the same command again with --download" in lines[0], done.stderr
    assert "sofim-tune train" not in lines[0] and not (tmp_path / "out").exists()


def test_show_json_prints_the_studys_state_as_one_object(tmp_path):
    outcome = tune(load_spec("digits").replace(trials=2, epochs=1), RunOptions(out_dir=tmp_path / "run", device="cpu", workers=1, export=False))
    done = subprocess.run([sys.executable, "-m", "sofim_tune.cli.app", "show", str(tmp_path / "run"), "--json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    state = json.loads(done.stdout)
    best = outcome.study.best_trial()
    assert state["name"] == "digits-mlp" and state["target"] == 2 and state["finished"] is True
    assert state["counts"]["complete"] + state["counts"]["pruned"] == 2 and state["best_value"] == best.value and state["best_params"] == best.params


def test_run_json_prints_one_object_on_stdout(tmp_path):
    done = subprocess.run([sys.executable, "-m", "sofim_tune.cli.app", "run", "--dataset", "digits", "--trials", "3", "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "run"), "--json"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)  # nothing else on stdout: the live view and notes go to stderr
    rec = load_recommendation(tmp_path / "run" / "best.json")
    assert summary["name"] == "digits-mlp" and summary["counts"]["complete"] + summary["counts"]["pruned"] == 3 and summary["counts"]["failed"] == 0 and summary["finished"] is True
    assert summary["best_json"] == str(tmp_path / "run" / "best.json") and (tmp_path / "run" / "report.html").samefile(summary["report"])
    assert summary["best_params"] is not None and set(summary["best_params"]) == set(rec.hyperparameters)


def test_out_is_the_one_name_for_where_output_goes_and_output_still_reads(results, tmp_path):
    run = results / "digits-mlp"
    cli = [sys.executable, "-m", "sofim_tune.cli.app"]
    new = subprocess.run([*cli, "export", str(run), "--out", str(tmp_path / "new.json")], capture_output=True, text=True, timeout=120)
    assert new.returncode == 0 and new.stderr == "", new.stderr
    old = subprocess.run([*cli, "export", str(run), "--output", str(tmp_path / "old.json")], capture_output=True, text=True, timeout=120)
    assert old.returncode == 0 and old.stderr.strip() == "note: --output is now --out (-o)", old.stderr
    assert json.loads((tmp_path / "new.json").read_text())["hyperparameters"] == json.loads((tmp_path / "old.json").read_text())["hyperparameters"]
    both = subprocess.run([*cli, "export", str(run), "--out", "a.json", "--output", "b.json"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert both.returncode == 2 and "give --out only" in both.stderr and not (tmp_path / "a.json").exists()
    for command in ("run", "compare", "export", "plot", "compare-summary"):
        help_text = subprocess.run([*cli, command, "--help"], capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"}).stdout
        assert "--out" in help_text and "-o" in help_text and "--output" not in help_text, command


CLI = [sys.executable, "-m", "sofim_tune.cli.app"]


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=120, cwd=cwd, env={**os.environ, "COLUMNS": "200"})


def test_study_name_is_the_new_name_of_a_stored_studys_name_and_study_still_reads(results):
    storage = f"sqlite:///{results / 'digits-mlp' / 'study.db'}"
    new = _cli("show", "--storage", storage, "--study-name", "digits-mlp", "--json")
    assert new.returncode == 0 and new.stderr == "", new.stderr
    old = _cli("show", "--storage", storage, "--study", "digits-mlp", "--json")
    assert old.returncode == 0 and old.stderr.strip() == "note: --study is now --study-name", old.stderr
    assert json.loads(old.stdout) == json.loads(new.stdout) and json.loads(new.stdout)["name"] == "digits-mlp"
    both = _cli("show", "--storage", storage, "--study-name", "digits-mlp", "--study", "digits-mlp")
    assert both.returncode == 2 and both.stderr.strip().splitlines() == ["error: give --study-name only (--study is its old name)"]
    for command in ("export", "plot", "show"):
        help_text = _cli(command, "--help").stdout
        assert "--study-name" in help_text and not re.search(r"--study\b(?!-)", help_text), command


def test_spec_is_the_new_name_of_a_study_spec_and_study_still_reads(tmp_path):
    spec = tmp_path / "mine.toml"
    spec.write_text('dataset = "digits"\ntrials = 0\n')  # a bad value: the spec is read, then refused
    new = _cli("run", "--spec", spec, "--out", tmp_path / "run")
    old = _cli("run", "--study", spec, "--out", tmp_path / "run")
    assert new.returncode == old.returncode == 2 and "trials" in new.stderr, new.stderr
    assert old.stderr.splitlines() == ["note: --study is now --spec", *new.stderr.splitlines()]
    both = _cli("compare", "--spec", spec, "--study", spec, "--out", tmp_path / "cmp")
    assert both.returncode == 2 and "give --spec only" in both.stderr and not (tmp_path / "run").exists() and not (tmp_path / "cmp").exists()
    for command in ("run", "compare"):
        help_text = _cli(command, "--help").stdout
        assert "--spec" in help_text and not re.search(r"--study\b(?!-)", help_text), command


@pytest.mark.parametrize(
    "args, named",
    [
        (("run", "--dataset", "digits", "--epochs", "abc"), "--epochs"),
        (("run", "--dataset", "digits", "--no-such-flag"), "--no-such-flag"),
        (("export", "a", "b"), "b"),
        (("no-such-command",), "no-such-command"),
        (("run", "--dataset", "digits", "--sampler", "bogus"), "'bogus' is not one of 'tpe', 'random', 'qmc', 'cmaes', 'gp', 'grid'"),
        (("compare", "--dataset", "digits", "--backend", "dask"), "'optuna', 'ray'"),
        (("train", "--schedule", "linear"), "'constant', 'cosine', 'warmup-cosine'"),
    ],
)
def test_clicks_own_usage_errors_are_one_line_with_exit_2(tmp_path, args, named):
    done = _cli(*args, cwd=tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ") and named in lines[0] and "--help" in lines[0]
    assert "Traceback" not in done.stderr and not list(tmp_path.iterdir())


def test_fixed_values_are_choices_that_help_lists():
    from sofim_tune.choices import AUGMENT_MODES, BACKENDS, PRUNERS, SAMPLERS, SCHEDULES

    help_text = _cli("run", "--help").stdout
    for values in (SAMPLERS, PRUNERS, AUGMENT_MODES, SCHEDULES, BACKENDS):
        assert "<" + "|".join(values) + ">" in help_text


def test_no_arguments_show_the_help(tmp_path):
    done = _cli(cwd=tmp_path)
    assert done.returncode == 2 and "run" in done.stdout + done.stderr and "Usage" in done.stdout + done.stderr


def test_export_json_prints_the_path_and_the_recommendation(results, tmp_path):
    target = tmp_path / "best.json"
    done = _cli("export", results / "digits-mlp", "-o", target, "--json")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    printed = json.loads(done.stdout)
    assert printed == {"path": str(target), "recommendation": json.loads(target.read_text())}
    assert printed["recommendation"]["metric"]["confirm"]["runs"] == "final"
