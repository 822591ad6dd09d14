"""The training recipe travels with the recommendation: best.json -> recipe_from_recommendation -> your loop."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from sofim_tune import SOFIM, recipe_from_recommendation
from sofim_tune.data import load_data
from sofim_tune.errors import UserInputError
from sofim_tune.models import build_model
from sofim_tune.recommend import load_recommendation
from sofim_tune.spec import load_spec
from sofim_tune.trial import TrialConfig, train_trial
from sofim_tune.tuning import RunOptions, tune

RECIPE = dict(schedule="warmup-cosine", warmup_epochs=1, label_smoothing=0.1, decoupled_weight_decay=True, augment="crop")


@pytest.fixture(scope="module")
def best_json(tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe")
    spec = load_spec("digits").replace(trials=3, epochs=3, confirm_top=1, confirm_seeds=2, enqueue=[], **RECIPE)
    return tune(spec, RunOptions(out_dir=out, device="cpu")).best_json


def test_best_json_records_the_recipe(best_json):
    fixed = load_recommendation(best_json).fixed
    assert {key: fixed[key] for key in RECIPE} == RECIPE
    assert fixed["epochs"] == 3 and fixed["batch_size"] == 64 and fixed["image_size"] is None


def test_a_loop_driven_by_the_recipe_reproduces_train_trial(best_json):
    """Ten lines of a user's own loop, with what recipe_from_recommendation returns."""
    rec = load_recommendation(best_json)
    seed = 7
    data = load_data("digits", device="cpu", val_fraction=0.3, split_seed=0)
    torch.manual_seed(seed)
    model = build_model("mlp", data.info)
    steps = math.ceil(len(data.train) / rec.fixed["batch_size"])
    recipe = recipe_from_recommendation(best_json, model.parameters(), steps_per_epoch=steps)
    assert isinstance(recipe.optimizer, SOFIM) and recipe.optimizer.defaults["decoupled_weight_decay"]
    generator = torch.Generator().manual_seed(seed)
    for _ in range(recipe.epochs):
        model.train()
        for x, y in data.train.batches(recipe.batch_size, shuffle=True, augment=recipe.augment, generator=generator):
            loss = F.cross_entropy(model(x), y, label_smoothing=recipe.label_smoothing)
            recipe.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            recipe.optimizer.step()
            recipe.scheduler.step()
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in data.val.batches(512, shuffle=False, augment="none"))

    config = TrialConfig(dataset="digits", arch="mlp", hyperparameters={**rec.hyperparameters, "weight_decay": rec.hyperparameters.get("weight_decay", rec.fixed.get("weight_decay", 0.0))},
                         epochs=3, batch_size=64, seed=seed, device="cpu", val_fraction=0.3, split_seed=0, **RECIPE)
    result = train_trial(config)
    assert result.status == "completed"
    assert correct / len(data.val) == pytest.approx(result.metrics["val_accuracy"], abs=1e-9)
    assert recipe.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # the cosine ended at 0


def test_a_first_release_best_json_gives_a_constant_recipe(best_json, tmp_path):
    import json

    data = json.loads(best_json.read_text())
    for key in RECIPE:
        del data["fixed"][key]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(data))
    recipe = recipe_from_recommendation(old, torch.nn.Linear(2, 2).parameters(), steps_per_epoch=4)
    assert recipe.scheduler is None and recipe.label_smoothing == 0.0 and recipe.augment == "none"
    assert not recipe.optimizer.defaults["decoupled_weight_decay"]


def test_the_schedule_spans_the_budget_of_a_pruned_trial_too():
    """A trial stopped after 1 of 4 epochs was on the 4-epoch schedule, not a 1-epoch one."""
    from sofim_tune.errors import TrialPruned

    lrs = []

    class StopAfterOne:
        def report(self, epoch, metrics):
            raise TrialPruned

    original = SOFIM.step

    def recording(self, *args, **kwargs):
        lrs.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SOFIM, "step", recording)
        result = train_trial(TrialConfig(dataset="digits", hyperparameters={"lr": 0.4, "rho": 1.0, "beta1": 0.9}, epochs=4, device="cpu", schedule="cosine"), StopAfterOne())
    assert result.status == "pruned"
    steps_per_epoch = len(lrs)
    assert lrs[-1] == pytest.approx(0.2 * (1 + math.cos(math.pi * (steps_per_epoch - 1) / (4 * steps_per_epoch))))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"schedule": "step"}, "unknown schedule"),
        ({"schedule": "warmup-cosine"}, "warm-up must be"),
        ({"warmup_epochs": 2}, "warm-up must be"),
        ({"label_smoothing": 1.0}, "label smoothing"),
        ({"optimizer": "sgd-momentum", "hyperparameters": {"lr": 0.1}, "decoupled_weight_decay": True}, "decoupled"),
    ],
)
def test_bad_recipes_are_refused(overrides, message):
    with pytest.raises(UserInputError, match=message):
        train_trial(TrialConfig(**{"dataset": "digits", "epochs": 3, "device": "cpu", **overrides}))


@pytest.mark.parametrize("command", ["train", "run"])
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--augment", "sideways"], "augment"),
        (["--image-size", "4"], "8"),
        (["--schedule", "step"], "schedule"),
        (["--warmup-epochs", "2"], "warm-up"),
        (["--schedule", "warmup-cosine", "--warmup-epochs", "30"], "warm-up"),
        (["--label-smoothing", "1.5"], "smoothing"),
        (["--optimizer", "sgd-momentum", "--decoupled-weight-decay"], "decoupled"),
    ],
)
def test_every_recipe_flag_rejects_bad_values_with_exit_2(command, flags, message, tmp_path):
    if command == "run" and flags[0] == "--optimizer":
        flags = ["--space", "sgd-momentum", "--decoupled-weight-decay"]
    extra = ["--out", str(tmp_path / "run")] if command == "run" else []
    args = [sys.executable, "-m", "sofim_tune.cli.app", command, "--dataset", "digits", "--device", "cpu", "--epochs", "3", *flags, *extra]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert not (tmp_path / "run").exists()


# One best.json per optimizer and recipe kind, made by the pipeline's own functions from a spec
# and a space, as a finished study would write it.
KINDS = {
    "sofim coupled, fixed decay": ("sofim", dict(decoupled_weight_decay=False)),
    "sofim decoupled, searched decay, warmup-cosine": ("sofim-wd", dict(decoupled_weight_decay=True, schedule="warmup-cosine", warmup_epochs=1)),
    "sofim-tensor coupled, searched decay, cosine": ("sofim-tensor-wd", dict(decoupled_weight_decay=False, schedule="cosine")),
    "sofim-tensor decoupled": ("sofim-tensor", dict(decoupled_weight_decay=True)),
    "sgd-momentum, fixed decay, cosine": ("sgd-momentum", dict(decoupled_weight_decay=False, schedule="cosine")),
    "sgd-momentum, searched decay": ("sgd-momentum-wd", dict(decoupled_weight_decay=False)),
    "adamw, fixed beta2, warmup-cosine": ("adamw", dict(decoupled_weight_decay=False, schedule="warmup-cosine", warmup_epochs=1)),
}
SETTINGS = {"lr": 0.05, "rho": 0.3, "beta1": 0.8, "momentum": 0.85, "weight_decay": 3e-4}


def _optimizer_fields(optimizer: torch.optim.Optimizer) -> tuple[type, list[dict]]:
    """The class and the groups' settings, at the lr a schedule starts from (a scheduler keeps it as ``initial_lr``)."""
    groups = [{k: v for k, v in group.items() if k not in ("params", "initial_lr")} | {"lr": group.get("initial_lr", group["lr"])} for group in optimizer.param_groups]
    return type(optimizer), groups


@pytest.mark.parametrize("space_name, recipe", KINDS.values(), ids=list(KINDS))
def test_the_recommendation_builds_the_optimizer_its_trials_trained_with(space_name, recipe, tmp_path):
    import json
    from datetime import datetime, timezone

    from sofim_tune import optimizer_from_recommendation
    from sofim_tune.records import TrialRecord
    from sofim_tune.recommend import build_recommendation, write_recommendation
    from sofim_tune.space import load_space
    from sofim_tune.study import RunOptions, record_from_metadata, study_metadata, trial_config
    from sofim_tune.trial import trial_optimizer

    spec = load_spec("digits").replace(epochs=3, **recipe)
    space = load_space(space_name)
    params = {name: SETTINGS[name] for name in space.params}
    now = datetime.now(timezone.utc)
    record = record_from_metadata(
        study_metadata(spec, space, "sqlite:///study.db"), name="kinds", backend="optuna",
        trials=[TrialRecord(0, "complete", params, 0.9, {1: 0.9}, {}, now, now)], confirmations=[],
    )
    path = write_recommendation(build_recommendation(record, confirmations=()), tmp_path / "best.json")

    model = torch.nn.Linear(3, 2)
    trained_with = _optimizer_fields(trial_optimizer(trial_config(spec, space, params, seed=0, device="cpu", options=RunOptions(out_dir=tmp_path)), model.parameters()))
    built = {
        "from the path": optimizer_from_recommendation(model.parameters(), path),
        "from the parsed mapping": optimizer_from_recommendation(model.parameters(), json.loads(path.read_text())),
        "from the Recommendation": optimizer_from_recommendation(model.parameters(), load_recommendation(path)),
        "in the recipe": recipe_from_recommendation(path, model.parameters(), steps_per_epoch=4).optimizer,
    }
    for how, optimizer in built.items():
        assert _optimizer_fields(optimizer) == trained_with, how
    group = trained_with[1][0]
    assert group["lr"] == SETTINGS["lr"] and group["weight_decay"] == (SETTINGS["weight_decay"] if "weight_decay" in params else space.fixed.get("weight_decay"))
    if trained_with[0] is SOFIM:
        assert group["decoupled_weight_decay"] is recipe["decoupled_weight_decay"]
        assert group["norm_scope"] == ("tensor" if space.optimizer == "sofim-tensor" else "group")


def test_a_recommendation_for_an_unknown_optimizer_is_refused(best_json):
    import json

    from sofim_tune import optimizer_from_recommendation

    data = json.loads(best_json.read_text()) | {"optimizer": "lion"}
    with pytest.raises(UserInputError, match="lion"):
        optimizer_from_recommendation(torch.nn.Linear(2, 2).parameters(), data)
