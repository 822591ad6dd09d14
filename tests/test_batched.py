"""TrialBatch: every member of a stacked batch reproduces its sequential train_trial twin."""

from __future__ import annotations

import pytest
import torch

from sofim_tune import UserInputError
from sofim_tune.batched import _UPDATES, TrialBatch, _squared_norms, batch_problem
from sofim_tune.trial import TrialConfig, prepare_trial, train_trial

# digits as its study spec trains it: 1,006 training images, 16 batches of 64 per epoch.
DIGITS = dict(dataset="digits", device="cpu", batch_size=64, val_fraction=0.3)

# Three members per optimizer, each with its own settings and seed: one plain, one with a
# warm-up schedule, label smoothing and (for SOFIM) decoupled weight decay, one with a cosine
# schedule, crop augmentation and an evaluation of the test split. The settings keep the CNN
# away from the chaotic regime in which a change of the last bit grows to 1e-3 within two
# epochs: there only a bit-for-bit batch could pass.
SETTINGS = {
    "sofim": [{"lr": 0.05, "rho": 1.0, "beta1": 0.9}, {"lr": 0.1, "rho": 2.0, "beta1": 0.9, "weight_decay": 1e-3}, {"lr": 0.02, "rho": 0.5, "beta1": 0.95, "weight_decay": 1e-2}],
    "sgd-momentum": [{"lr": 0.05, "momentum": 0.9}, {"lr": 0.1, "momentum": 0.8, "weight_decay": 1e-3}, {"lr": 0.02}],
    "adamw": [{"lr": 1e-3}, {"lr": 1e-3, "beta1": 0.85, "beta2": 0.99, "weight_decay": 0.05}, {"lr": 5e-4, "weight_decay": 0.0}],
}
SETTINGS["sofim-tensor"] = SETTINGS["sofim"]


@pytest.fixture(autouse=True)
def one_thread():
    # These small models gain nothing from a second thread, and on a busy machine OpenMP's
    # barriers would wait for it at every one of their many small ops.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def recipes(optimizer: str) -> list[dict]:
    return [
        {},
        dict(schedule="warmup-cosine", warmup_epochs=1, label_smoothing=0.1, decoupled_weight_decay=optimizer.startswith("sofim")),
        dict(schedule="cosine", augment="crop", evaluate_test=True),
    ]


def configs(arch: str, optimizer: str, epochs: int) -> list[TrialConfig]:
    return [
        TrialConfig(**DIGITS, arch=arch, optimizer=optimizer, epochs=epochs, hyperparameters=settings, seed=20 + i, **recipe)
        for i, (settings, recipe) in enumerate(zip(SETTINGS[optimizer], recipes(optimizer)))
    ]


def run(batch: TrialBatch) -> dict[int, object]:
    """Train until every member is done; the results by slot."""
    results = {}
    while batch.members:
        outcomes = batch.train_epoch()
        assert outcomes, "members that are done but not finished"
        for slot, outcome in outcomes.items():
            if outcome.done:
                results[slot] = batch.finish(slot)
    return results


def assert_same_history(ours: list[dict], theirs: list[dict]) -> None:
    assert len(ours) == len(theirs)
    for mine, twin in zip(ours, theirs):
        assert mine.keys() == twin.keys()
        # Bit for bit on the machines measured; the tolerance leaves room for a BLAS whose batched
        # product sums in another order than its single one.
        assert mine == pytest.approx(twin, rel=1e-4, abs=1e-9)


def assert_twins(result, config: TrialConfig) -> None:
    twin = train_trial(config)
    assert (result.status, result.epochs, result.diverged_epoch) == (twin.status, twin.epochs, twin.diverged_epoch)
    assert (result.arch, result.augment, result.preprocessing, result.config) == (twin.arch, twin.augment, twin.preprocessing, twin.config)
    assert_same_history(result.history, twin.history)
    assert result.metrics == (result.history[-1] if result.history else {})


@pytest.mark.parametrize("optimizer", ["sofim", "sofim-tensor", "sgd-momentum", "adamw"])
@pytest.mark.parametrize("arch, epochs", [("mlp", 3), ("cnn", 2)])
def test_every_member_equals_its_sequential_twin(arch, epochs, optimizer):
    members = configs(arch, optimizer, epochs)
    data = prepare_trial(members[-1])  # evaluate_test: the data with its test split
    batch = TrialBatch(data, arch=arch, optimizer=optimizer, batch_size=64, slots=3)
    slots = [batch.add(config) for config in members]
    assert batch.free_slots == 0
    results = run(batch)
    assert batch.free_slots == 3 and not batch.members
    for slot, config in zip(slots, members):
        assert results[slot].status == "completed"
        assert_twins(results[slot], config)
    assert "test_accuracy" in results[slots[-1]].metrics and "test_accuracy" not in results[slots[0]].metrics
    assert ("fisher_ratio" in results[slots[0]].metrics) == optimizer.startswith("sofim")


def test_a_member_added_into_a_freed_slot_equals_its_twin():
    def sofim(lr: float, seed: int, **recipe) -> TrialConfig:
        return TrialConfig(**{**DIGITS, "arch": "mlp", "epochs": 3, "hyperparameters": {"lr": lr, "rho": 1.0, "beta1": 0.9}, "seed": seed, **recipe})

    first, second, late = sofim(0.1, 1), sofim(0.2, 2), sofim(0.4, 3, schedule="cosine", epochs=4)
    batch = TrialBatch(prepare_trial(first), arch="mlp", optimizer="sofim", batch_size=64, slots=2)
    slot_first, slot_second = batch.add(first), batch.add(second)
    epoch_one = batch.train_epoch()
    assert {slot: outcome.epoch for slot, outcome in epoch_one.items()} == {slot_first: 1, slot_second: 1}
    with pytest.raises(RuntimeError, match="all 2 slots are taken"):
        batch.add(late)
    with pytest.raises(ValueError, match="trained 1 of 3 epochs"):
        batch.finish(slot_first)
    pruned = batch.finish(slot_first, pruned=True)
    assert pruned.status == "pruned" and pruned.epochs == 1
    assert_same_history(pruned.history, train_trial(TrialConfig(**{**first.__dict__, "epochs": 1})).history)
    assert batch.add(late) == slot_first  # the freed slot, refilled while the other member is mid-run
    outcome = batch.train_epoch()
    assert {slot: o.epoch for slot, o in outcome.items()} == {slot_first: 1, slot_second: 2}
    results = run(batch)
    assert_twins(results[slot_second], second)
    assert_twins(results[slot_first], late)


def test_members_that_train_at_their_own_pace_equal_their_twins():
    # How a Ray batch server trains: only the members whose trials asked for an epoch.
    first, second = (TrialConfig(**DIGITS, arch="cnn", epochs=3, hyperparameters={"lr": lr, "rho": 1.0, "beta1": 0.9}, seed=seed) for lr, seed in ((0.05, 1), (0.1, 2)))
    batch = TrialBatch(prepare_trial(first), arch="cnn", optimizer="sofim", batch_size=64, slots=2)
    slot_first, slot_second = batch.add(first), batch.add(second)
    assert {slot: o.epoch for slot, o in batch.train_epoch([slot_second]).items()} == {slot_second: 1}
    assert {slot: o.epoch for slot, o in batch.train_epoch([slot_first]).items()} == {slot_first: 1}
    assert {slot: o.epoch for slot, o in batch.train_epoch([slot_first]).items()} == {slot_first: 2}
    assert {slot: o.epoch for slot, o in batch.train_epoch().items()} == {slot_first: 3, slot_second: 2}
    assert_twins(batch.finish(slot_first), first)
    assert_twins(run(batch)[slot_second], second)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_a_diverged_member_is_reported_at_the_twins_epoch_and_leaves_the_others_alone(arch):
    # 63 batches of 16: the divergence check inside the epoch (every 32 batches) runs too.
    settings = [{"lr": 0.05, "momentum": 0.9}, {"lr": 1e20, "momentum": 0.9}, {"lr": 0.02, "momentum": 0.5}]
    members = [TrialConfig(**{**DIGITS, "batch_size": 16}, arch=arch, optimizer="sgd-momentum", epochs=3, hyperparameters=s, seed=i) for i, s in enumerate(settings)]
    batch = TrialBatch(prepare_trial(members[0]), arch=arch, optimizer="sgd-momentum", batch_size=16, slots=3)
    slots = [batch.add(config) for config in members]
    outcomes = batch.train_epoch()
    assert outcomes[slots[1]].diverged and outcomes[slots[1]].done and outcomes[slots[1]].epoch == 1
    assert not outcomes[slots[0]].diverged and not outcomes[slots[0]].done
    diverged = batch.finish(slots[1])
    assert (diverged.status, diverged.diverged_epoch, diverged.epochs, diverged.metrics) == ("diverged", 1, 0, {})
    assert_twins(diverged, members[1])
    assert len(batch.train_epoch()) == 2  # the diverged member's slot takes no more part
    results = run(batch)
    for slot, config in zip(slots[::2], members[::2]):
        assert results[slot].status == "completed"
        assert_twins(results[slot], config)


def test_batch_problem_names_what_cannot_be_batched():
    config = TrialConfig(**DIGITS, arch="mlp", epochs=1)
    data = prepare_trial(config)
    assert batch_problem(config, data) is None
    assert batch_problem(TrialConfig(**DIGITS, arch="cnn", epochs=1), data) is None
    resnet = batch_problem(TrialConfig(**DIGITS, arch="resnet18", epochs=1), data)
    assert resnet is not None and resnet.startswith("resnet18: a _ResNet, not an nn.Sequential")
    assert "torchvision" in batch_problem(TrialConfig(**DIGITS, arch="tv:resnet18", epochs=1), data)
    assert "lr must be > 0" in batch_problem(TrialConfig(**DIGITS, arch="mlp", epochs=1, hyperparameters={"lr": 0.0}), data)
    batch = TrialBatch(data, arch="mlp", optimizer="sofim", batch_size=64, slots=2)
    with pytest.raises(UserInputError, match="resnet18: a _ResNet"):
        batch.add(TrialConfig(**DIGITS, arch="resnet18", epochs=1))
    with pytest.raises(UserInputError, match="this batch trains mlp with sofim at batch size 64"):
        batch.add(TrialConfig(**DIGITS, arch="mlp", epochs=1, optimizer="adamw", hyperparameters={"lr": 1e-3}))
    assert batch.free_slots == 2


# Settings whose sequential run computes a power the vectorised pow rounds otherwise (0.95²¹),
# in every slot of a batch of four: a member after the first starts its rows mid cache line
# when its tensors' sizes are not multiples of 16 floats (the 10-class head's bias).
EXACT = {
    "sofim": [{"lr": 0.03 * rho, "rho": rho, "beta1": beta1} for rho, beta1 in ((1.0, 0.95), (1.0, 0.8), (3.0, 0.9), (0.3, 0.99))],
    "adamw": [{"lr": lr, "beta1": beta1, "beta2": beta2} for lr, beta1, beta2 in ((1e-3, 0.95, 0.999), (2e-3, 0.9, 0.99), (5e-4, 0.8, 0.95), (1e-3, 0.99, 0.9999))],
}


@pytest.mark.parametrize("arch,optimizer", [("mlp", "sofim"), ("cnn", "sofim"), ("mlp", "adamw")])
def test_every_slot_reproduces_its_twin_bit_for_bit(arch, optimizer):
    # Exact on this project's machines (x86-64, torch's MKL and oneDNN); the tolerant tests above
    # are the contract for other BLAS builds.
    trials = [TrialConfig(**DIGITS, arch=arch, optimizer=optimizer, epochs=2, hyperparameters=settings, seed=40 + i) for i, settings in enumerate(EXACT[optimizer])]
    batch = TrialBatch(prepare_trial(trials[0]), arch=arch, optimizer=optimizer, batch_size=64, slots=len(trials))
    slots = {batch.add(config): config for config in trials}
    for slot, result in run(batch).items():
        assert result.history == train_trial(slots[slot]).history, f"slot {slot}"


def test_a_row_of_the_stack_is_summed_as_a_tensor_of_its_own():
    # BLAS orders a dot's additions by where the vector starts in its cache line; a 10-element
    # row of a stack starts mid line in three slots of four, and then 17% of random rows differed.
    torch.manual_seed(0)
    for _ in range(200):
        moments = torch.randn(4, 10) * 1e-2
        assert _squared_norms(moments).tolist() == [torch.dot(row.clone(), row.clone()).item() for row in moments]


def test_bias_corrections_are_the_powers_the_sequential_optimizers_take():
    # Over a long table (a member alone with 63 steps an epoch, batches of 16) torch's vectorised
    # pow rounds some powers (0.99**25, 0.999**32: AdamW's default beta2) one ulp away from the C
    # library's, which SOFIM's CPU path and torch.optim.AdamW take (Python floats).
    steps = range(1, 64)
    for optimizer, settings in (("sofim", {"lr": 0.03, "rho": 1.0, "beta1": 0.99}), ("adamw", {"lr": 1e-3, "beta1": 0.99, "beta2": 0.999})):
        config = TrialConfig(**{**DIGITS, "batch_size": 16}, arch="mlp", optimizer=optimizer, epochs=1, hyperparameters=settings)
        batch = TrialBatch(prepare_trial(config), arch="mlp", optimizer=optimizer, batch_size=16, slots=1)
        batch.add(config)
        update = _UPDATES[optimizer](list(batch._members.values()), batch.steps_per_epoch, torch.device("cpu"))
        if optimizer == "sofim":
            assert update.correction[:, 0].tolist() == [1.0 - 0.99**step for step in steps]
        else:
            assert update.correction2_sqrt[:, 0].tolist() == torch.tensor([(1 - 0.999**step) ** 0.5 for step in steps]).tolist()
            assert update.negative_step_sizes[:, 0].tolist() == torch.tensor([-1e-3 / (1 - 0.99**step) for step in steps]).tolist()
