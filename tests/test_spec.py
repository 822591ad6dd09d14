"""Study specs: shipped files, defaults, folder datasets, overrides, and every rejected input."""

from __future__ import annotations

import dataclasses

import re
from pathlib import Path

import pytest

from sofim_tune.data import dataset_info
from sofim_tune.errors import UserInputError
from sofim_tune.space import MAX_FILE_BYTES, load_space
from sofim_tune.spec import DEFAULT_TRIALS, StudySpec, load_spec, spec_names

BASE_TOML = """\
dataset = "digits"
arch = "mlp"
search_space = "sofim"
epochs = 10
batch_size = 64
trials = 40
sampler = "tpe"
pruner = "hyperband"
metric = "val_accuracy"
direction = "maximize"
seed = 0
val_fraction = 0.1
confirm_top = 3
confirm_seeds = 3
enqueue = [{lr = 0.1, rho = 1.0, beta1 = 0.9}]
"""


def write(tmp_path: Path, text: str, name: str = "study.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def with_line(key: str, value: str) -> str:
    """BASE_TOML with ``key``'s line replaced (or added) by ``key = value``."""
    lines = [line for line in BASE_TOML.splitlines() if not line.startswith(f"{key} =")]
    return "\n".join([*lines, f"{key} = {value}"]) + "\n"


def image_folder(tmp_path: Path, name: str = "flowers") -> Path:
    folder = tmp_path / name
    (folder / "rose").mkdir(parents=True)
    return folder


@pytest.mark.parametrize("name", spec_names())
def test_shipped_spec_loads(name: str) -> None:
    dataset, arch = name.rsplit("-", 1)
    spec = load_spec(dataset, arch, study=name)
    assert spec.name == name
    assert f"{spec.dataset}-{spec.arch}" == name
    assert spec.source == f"studies/{name}.toml"
    # Found without naming it, for the dataset's default architecture.
    assert load_spec(spec.dataset, spec.arch) == spec
    assert spec.arch == dataset_info(spec.dataset).default_arch
    # Its enqueued settings fit its space.
    space = load_space(spec.search_space)
    for setting in spec.enqueue:
        space.from_hyperparameters(setting)


def test_shipped_specs_cover_every_dataset() -> None:
    assert set(spec_names()) == {
        "digits-mlp",
        "mnist-cnn",
        "fashion-mnist-cnn",
        "cifar10-resnet18",
        "cifar100-resnet18",
        "svhn-resnet18",
    }


def test_cifar100_is_the_design_one_with_its_recipe() -> None:
    spec = load_spec("cifar100")
    assert (spec.dataset, spec.arch, spec.search_space) == ("cifar100", "resnet18", "sofim-wd")
    assert (spec.augment, spec.schedule, spec.warmup_epochs, spec.decoupled_weight_decay) == ("crop-flip", "warmup-cosine", 1, True)
    assert (spec.epochs, spec.batch_size, spec.trials) == (30, 256, 64)
    assert (spec.sampler, spec.pruner, spec.metric, spec.direction) == ("tpe", "hyperband", "val_accuracy", "maximize")


def test_digits_enqueues_the_paper_default() -> None:
    spec = load_spec("digits")
    assert (spec.epochs, spec.batch_size, spec.trials) == (10, 64, 40)
    assert spec.enqueue == ({"lr": 0.1, "rho": 1.0, "beta1": 0.9},)


def test_defaults_for_a_dataset_without_a_spec() -> None:
    spec = load_spec("mnist", "mlp")
    info = dataset_info("mnist")
    assert spec == StudySpec(
        name="mnist-mlp",
        dataset="mnist",
        arch="mlp",
        search_space="sofim",
        epochs=info.default_epochs,
        batch_size=info.default_batch_size,
        trials=DEFAULT_TRIALS,
        source="defaults",
    )
    assert spec.enqueue == ()


def test_folder_dataset_defaults(tmp_path: Path) -> None:
    folder = image_folder(tmp_path)
    spec = load_spec(str(folder))
    assert (spec.name, spec.dataset, spec.arch) == ("flowers-cnn", str(folder), "cnn")
    assert (spec.epochs, spec.batch_size, spec.trials, spec.search_space) == (10, 64, DEFAULT_TRIALS, "sofim")
    assert spec.source == "defaults"
    assert load_spec(str(folder), "resnet18").name == "flowers-resnet18"


def test_user_spec_fills_missing_keys_from_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, 'trials = 8\nmetric = "val_loss"\n')
    spec = load_spec("cifar10", study=path)
    assert (spec.name, spec.arch, spec.epochs, spec.batch_size) == ("cifar10-resnet18", "resnet18", 30, 256)
    assert spec.trials == 8
    # A metric without a direction brings its own.
    assert (spec.metric, spec.direction) == ("val_loss", "minimize")
    assert spec.source == str(path)


def test_user_spec_paths_start_at_its_folder(tmp_path: Path) -> None:
    (tmp_path / "mine.yaml").write_text("optimizer: sofim\nparams:\n  lr: {low: 0.01, high: 1.0}\n")
    image_folder(tmp_path)
    path = write(tmp_path, 'dataset = "flowers"\nsearch_space = "mine.yaml"\nname = "roses"\n')
    spec = load_spec(str(tmp_path / "flowers"), study=path)
    assert spec.search_space == str(tmp_path / "mine.yaml")
    assert spec.name == "roses"
    assert load_space(spec.search_space).params["lr"].high == 1.0


def test_replace_applies_and_validates() -> None:
    spec = load_spec("cifar10")
    assert spec.replace(trials=5, epochs=None).trials == 5
    assert spec.replace(trials=5).epochs == spec.epochs
    assert spec.replace(metric="val_loss").direction == "minimize"
    assert spec.replace() == spec
    with pytest.raises(UserInputError, match=r"^overrides of studies/cifar10-resnet18\.toml: trials: must be >= 1 \(got 0\)$"):
        spec.replace(trials=0)
    with pytest.raises(UserInputError, match=r"direction: val_loss must be minimized"):
        spec.replace(metric="val_loss", direction="maximize")
    with pytest.raises(UserInputError, match=r"sampler: unknown sampler 'bayes'; choose one of tpe, random"):
        spec.replace(sampler="bayes")


def test_replace_with_a_missing_space_file(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="search_space: no such file"):
        load_spec("digits").replace(search_space=str(tmp_path / "none.yaml"))


def test_unknown_dataset_without_spec() -> None:
    with pytest.raises(UserInputError, match="unknown dataset 'imagenet'"):
        load_spec("imagenet")


def test_unknown_shipped_spec() -> None:
    with pytest.raises(UserInputError, match="unknown study spec 'mnist-vit'; shipped: cifar10-resnet18"):
        load_spec("mnist", study="mnist-vit")


def test_missing_spec_file(tmp_path: Path) -> None:
    path = tmp_path / "gone.toml"
    with pytest.raises(UserInputError, match=rf"^{re.escape(str(path))}: study spec file not found$"):
        load_spec("digits", study=path)


BAD_SPECS = {
    "not toml": ("epochs = = 3\n", "not valid TOML"),
    "unknown key": (with_line("learning_rate", "0.1"), "learning_rate: unknown key; valid keys: name, dataset"),
    "epochs as text": (with_line("epochs", '"ten"'), "epochs: expected an integer, got 'ten'"),
    "epochs as float": (with_line("epochs", "10.0"), "epochs: expected an integer"),
    "epochs as bool": (with_line("epochs", "true"), "epochs: expected an integer"),
    "epochs 0": (with_line("epochs", "0"), "epochs: must be >= 1 (got 0)"),
    "batch_size 0": (with_line("batch_size", "0"), "batch_size: must be >= 1"),
    "trials 0": (with_line("trials", "0"), "trials: must be >= 1"),
    "confirm_top 0": (with_line("confirm_top", "0"), "confirm_top: must be >= 1"),
    "confirm_seeds 0": (with_line("confirm_seeds", "0"), "confirm_seeds: must be >= 1"),
    "negative seed": (with_line("seed", "-1"), "seed: must be >= 0"),
    "unknown sampler": (with_line("sampler", '"bayes"'), "sampler: unknown sampler 'bayes'; choose one of tpe, random, qmc, cmaes, gp, grid"),
    "unknown pruner": (with_line("pruner", '"asha"'), "pruner: unknown pruner 'asha'; choose one of hyperband, median, sha, none"),
    "unknown metric": (with_line("metric", '"accuracy"'), "metric: unknown metric 'accuracy'; choose one of val_accuracy, val_loss"),
    "direction against metric": (with_line("direction", '"minimize"'), "direction: val_accuracy must be maximized"),
    "val_fraction 0": (with_line("val_fraction", "0.0"), "val_fraction: must be in (0, 1)"),
    "val_fraction 1": (with_line("val_fraction", "1"), "val_fraction: must be in (0, 1)"),
    "val_fraction text": (with_line("val_fraction", '"10%"'), "val_fraction: expected a number"),
    "empty arch": (with_line("arch", '""'), "arch: expected a non-empty string"),
    "empty name": (with_line("name", '""'), "name: expected a non-empty string"),
    "unknown space": (with_line("search_space", '"lion"'), "search_space: unknown search space 'lion'"),
    "missing space file": (with_line("search_space", '"nowhere.yaml"'), "search_space: no such file"),
    "enqueue not an array": (with_line("enqueue", "0.1"), "enqueue: expected an array of tables"),
    "enqueue empty table": (with_line("enqueue", "[{}]"), "enqueue[0]: expected a non-empty table"),
    "enqueue unknown name": (with_line("enqueue", "[{lr = 0.1, betal = 0.9}]"), "enqueue[0].betal: unknown key"),
    "enqueue text value": (with_line("enqueue", '[{lr = 0.1}, {lr = "fast"}]'), "enqueue[1].lr: expected a number"),
}


@pytest.mark.parametrize(("text", "expected"), BAD_SPECS.values(), ids=BAD_SPECS.keys())
def test_bad_spec_names_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(UserInputError) as info:
        load_spec("digits", study=path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert expected in message, message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("dataset", "arch", "expected"),
    [
        ("mnist", None, "dataset: the spec is for 'digits', not 'mnist'"),
        ("digits", "cnn", "arch: the spec is for 'mlp', not 'cnn'"),
    ],
)
def test_spec_disagreeing_with_the_request(tmp_path: Path, dataset: str, arch: str | None, expected: str) -> None:
    path = write(tmp_path, BASE_TOML)
    with pytest.raises(UserInputError, match=rf"^{re.escape(str(path))}: {re.escape(expected)}"):
        load_spec(dataset, arch, study=path)


def test_spec_with_an_unknown_dataset(tmp_path: Path) -> None:
    path = write(tmp_path, 'trials = 4\n')
    with pytest.raises(UserInputError, match="unknown dataset 'imagenet'"):
        load_spec("imagenet", study=path)
    spec = StudySpec("x", "digits", "mlp", "sofim", 1, 1, 1, source=str(path))
    with pytest.raises(UserInputError, match=rf"^overrides of {re.escape(str(path))}: dataset: unknown dataset 'imagenet'"):
        spec.replace(dataset="imagenet")


# ---------------------------------------------------------------------------------------
# The study name is a path component
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["../x", "..", "a/b", "a\\\\b", "/etc", ".hidden", "-x", "a..b", "with space", "tab\\tname", "x" * 129, "é"]
)
def test_unsafe_name_is_refused(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, with_line("name", f'"{name}"'))
    with pytest.raises(UserInputError) as info:
        load_spec("digits", study=path)
    message = str(info.value)
    assert message.startswith(f"{path}: name: "), message
    assert "\n" not in message and len(message) - len(str(path)) < 300


def test_unsafe_name_is_refused_in_overrides() -> None:
    with pytest.raises(UserInputError, match=r"^overrides of studies/digits-mlp\.toml: name: '\.\./x' is not a safe study name"):
        load_spec("digits").replace(name="../x")


@pytest.mark.parametrize("name", ["a", "cifar100-resnet18", "v1.2_final", "X" * 128])
def test_safe_names(tmp_path: Path, name: str) -> None:
    assert load_spec("digits", study=write(tmp_path, with_line("name", f'"{name}"'))).name == name


def test_default_name_is_made_safe(tmp_path: Path) -> None:
    # torchvision archs are tv:NAME; a folder's name may hold spaces or dots.
    assert load_spec("cifar10", "tv:resnet50").name == "cifar10-tv-resnet50"
    assert load_spec(str(image_folder(tmp_path, "my flowers (2024)")), "tv:vit_b_16").name == "my-flowers-2024-tv-vit_b_16"
    assert load_spec(str(image_folder(tmp_path, "..hidden..data"))).name == "hidden.data-cnn"
    # A user's spec without a name gets the same default.
    path = write(tmp_path, 'arch = "tv:resnet18"\n')
    assert load_spec("cifar10", study=path).name == "cifar10-tv-resnet18"


# ---------------------------------------------------------------------------------------
# The dataset from the spec alone (--spec my.toml without --dataset)
# ---------------------------------------------------------------------------------------


def test_dataset_from_the_spec(tmp_path: Path) -> None:
    spec = load_spec(None, study=write(tmp_path, BASE_TOML))
    assert (spec.dataset, spec.arch, spec.name, spec.trials) == ("digits", "mlp", "digits-mlp", 40)
    assert load_spec(study="cifar10-resnet18") == load_spec("cifar10")


def test_folder_dataset_from_the_spec_starts_at_its_folder(tmp_path: Path) -> None:
    folder = image_folder(tmp_path)
    spec = load_spec(study=write(tmp_path, 'dataset = "flowers"\ntrials = 5\n'))
    assert (spec.dataset, spec.arch, spec.name, spec.epochs, spec.trials) == (str(folder), "cnn", "flowers-cnn", 10, 5)
    # The same study named with --dataset too.
    assert load_spec(str(folder), study=tmp_path / "study.toml") == spec


def test_dataset_from_the_spec_still_checks_arch(tmp_path: Path) -> None:
    path = write(tmp_path, BASE_TOML)
    with pytest.raises(UserInputError, match=rf"^{re.escape(str(path))}: arch: the spec is for 'mlp', not 'cnn'$"):
        load_spec(None, "cnn", study=path)


def test_no_dataset_anywhere(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match=r"^name a dataset with --dataset, or a study spec \(--spec\) that has a `dataset` key$"):
        load_spec(None)
    path = write(tmp_path, "trials = 4\n")
    with pytest.raises(UserInputError, match=rf"^{re.escape(str(path))}: dataset: missing; name a dataset with --dataset"):
        load_spec(None, study=path)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('dataset = "imagenet"', "dataset: unknown dataset '{folder}"),  # a path: next to the spec
        ("dataset = 3", "dataset: expected a non-empty string, got 3"),
        ('dataset = ""', "dataset: expected a non-empty string, got ''"),
    ],
)
def test_bad_dataset_in_the_spec_alone(tmp_path: Path, line: str, expected: str) -> None:
    path = write(tmp_path, line + "\n")
    expected = expected.format(folder=tmp_path)
    with pytest.raises(UserInputError, match=rf"^{re.escape(str(path))}: {re.escape(expected)}"):
        load_spec(None, study=path)


# ---------------------------------------------------------------------------------------
# Hostile files: size, depth, huge values
# ---------------------------------------------------------------------------------------

MEGABYTE = 1_000_000

HOSTILE_SPECS = {
    "huge value": f'sampler = "{"s" * MEGABYTE}"\n',
    "huge key": f"{'k' * MEGABYTE} = 1\n",
    "huge quoted key": f'"{"q" * MEGABYTE}" = 1\n',
    "huge enqueue key": f"enqueue = [{{{'e' * MEGABYTE} = 0.1}}]\n",
    "huge enqueue value": f'enqueue = [{{lr = "{"v" * MEGABYTE}"}}]\n',
    "huge name": f'name = "{"n" * MEGABYTE}"\n',
    "huge arch": f'arch = "{"a" * MEGABYTE}"\n',
    "huge dataset": f'dataset = "{"d" * MEGABYTE}"\n',
    "huge search_space": f'search_space = "{"x" * MEGABYTE}"\n',
    "huge direction": f'direction = "{"m" * MEGABYTE}"\n',
    "huge list": f"trials = [{', '.join(['1'] * 300_000)}]\n",
    "huge int": f"seed = {'9' * 4000}\n",
    "list metric (unhashable)": 'metric = ["val_loss"]\n',
    "deep nesting": "trials = " + "[" * 100_000 + "]" * 100_000 + "\n",
    "too many settings": "enqueue = [" + ", ".join(["{lr = 0.1}"] * 1001) + "]\n",
    "newline in a path": 'search_space = "a\\nb.yaml"\n',
    "NUL in a path": 'dataset = "fl\\u0000owers"\n',
}


@pytest.mark.parametrize("text", HOSTILE_SPECS.values(), ids=HOSTILE_SPECS.keys())
def test_hostile_spec_gives_a_short_line(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(UserInputError) as info:
        load_spec("digits", study=path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message[:300]
    # Past the path, only the quoted excerpt (short) and the fixed list of valid keys remain.
    valid_keys = len(", ".join(f.name for f in dataclasses.fields(StudySpec)))
    assert len(message) - len(str(path)) < 300 + valid_keys, message[:900]
    assert "\n" not in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("enqueue = [" + ", ".join(["{lr = 0.1}"] * 1001) + "]\n", "enqueue: at most 1000 settings, got 1,001"),
        ("trials = " + "[" * 100_000 + "]" * 100_000 + "\n", "not valid TOML: nested too deeply"),
        (f"seed = {'9' * 20}\n", "seed: expected an integer of at most 19 digits"),
        (f"seed = {'9' * 5000}\n", "not valid TOML: Exceeds the limit (4300 digits) for integer string conversion"),
        ('metric = ["val_loss"]\n', "metric: unknown metric ['val_loss']"),
        ('arch = "a\\nb"\n', "arch: 'a\\nb' contains control characters (a newline, a tab, a NUL)"),
        (f'arch = "{"a" * 201}"\n', "arch: too long: 201 characters, at most 200"),
    ],
    ids=["enqueue cap", "depth", "64 bits", "5000 digits", "unhashable", "control characters", "long arch"],
)
def test_hostile_spec_messages(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(UserInputError, match=rf"^{re.escape(str(path))}: {re.escape(expected)}"):
        load_spec("digits", study=path)


def test_spec_over_a_mebibyte_is_refused_unread(tmp_path: Path) -> None:
    path = write(tmp_path, "trials = 4\n" + "#" * MAX_FILE_BYTES + "\n")
    with pytest.raises(UserInputError, match=rf"^{re.escape(str(path))}: larger than 1 MiB; a study spec file is a few lines$"):
        load_spec("digits", study=path)


def test_long_dataset_argument_is_cut() -> None:
    # Not from a file, but the message still quotes it short.
    with pytest.raises(UserInputError) as info:
        load_spec("d" * 100_000)
    assert str(info.value).startswith("unknown dataset 'ddd") and len(str(info.value)) < 300


def test_digits_validates_on_at_least_400_images_with_any_arch() -> None:
    """One example is at most 0.25 points: with the shipped spec and without one (cnn)."""
    from sofim_tune.data import load_data

    for spec in (load_spec("digits"), load_spec("digits", "cnn")):
        data = load_data("digits", device="cpu", val_fraction=spec.val_fraction, split_seed=spec.split_seed)
        assert len(data.val) >= 400 and 100 / len(data.val) <= 0.25
