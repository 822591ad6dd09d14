"""Training epochs each search strategy spends until it finds a near-best setting, on digits.

For every strategy and seed, the script runs a study and counts the epochs actually trained
(pruned trials count the epochs they ran) until the first trial whose validation accuracy
is within ``--tolerance`` (0.5 percentage points) of the best accuracy known for the task.
That best is taken from a large random search without pruning, run once and cached in
``benchmarks/.cache/``. Strategies: the default (TPE + Hyperband) and random search without
pruning, each with the ``sofim`` and ``sofim-effective`` spaces. Target: the default needs at
least 3x fewer epochs than random search without pruning. Prints medians over seeds.

    python benchmarks/tuning_efficiency.py [--seeds 5] [--trials 40] [--epochs 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from sofim_tune.records import StudyRecord
from sofim_tune.spec import StudySpec, load_spec
from sofim_tune.tuning import RunOptions, tune

CACHE = Path(__file__).parent / ".cache"
STRATEGIES = {
    "tpe+hyperband / sofim": dict(sampler="tpe", pruner="hyperband", search_space="sofim"),
    "tpe+hyperband / sofim-effective": dict(sampler="tpe", pruner="hyperband", search_space="sofim-effective"),
    "random, no pruning / sofim": dict(sampler="random", pruner="none", search_space="sofim"),
    "random, no pruning / sofim-effective": dict(sampler="random", pruner="none", search_space="sofim-effective"),
}


def run(spec: StudySpec) -> StudyRecord:
    with tempfile.TemporaryDirectory() as folder:
        return tune(spec, RunOptions(out_dir=Path(folder), device="cpu", export=False)).study


def best_known(base: StudySpec, trials: int, cache: Path) -> float:
    """Best validation accuracy of a large random search; cached, since it costs the most."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"digits-best-known-e{base.epochs}-t{trials}-v{base.val_fraction}.json"
    if path.exists():
        return json.loads(path.read_text())["best"]
    record = run(base.replace(name="best-known", sampler="random", pruner="none", trials=trials, seed=12345))
    best = max(t.value for t in record.by_state("complete"))
    path.write_text(json.dumps({"best": best, "trials": trials, "epochs": base.epochs}))
    return best


def epochs_to_target(record: StudyRecord, target: float) -> tuple[int, bool]:
    spent = 0
    for trial in sorted(record.trials, key=lambda t: t.number):
        spent += len(trial.intermediate)
        if trial.state == "complete" and trial.value is not None and trial.value >= target:
            return spent, True
    return spent, False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--reference-trials", type=int, default=150)
    parser.add_argument("--tolerance", type=float, default=0.005)
    parser.add_argument("--val-fraction", type=float, default=0.3, help="a larger hold-out than studies use, so that 0.5 points is ~2 images, not less than one")
    parser.add_argument("--cache", type=Path, default=CACHE, help="where the best-known accuracy is cached")
    args = parser.parse_args()
    # The paper-style default is not enqueued, so that every strategy starts from its own draws.
    base = load_spec("digits").replace(epochs=args.epochs, trials=args.trials, enqueue=(), val_fraction=args.val_fraction)
    best = best_known(base, args.reference_trials, args.cache)
    target = best - args.tolerance
    print(f"digits/mlp, validation {args.val_fraction:.0%} of the training data, {args.epochs} epochs per trial, {args.trials} trials, {args.seeds} seeds; best known val accuracy {best:.4f}, target >= {target:.4f}")
    medians = {}
    for name, changes in STRATEGIES.items():
        counts, reached = [], 0
        for seed in range(args.seeds):
            spent, ok = epochs_to_target(run(base.replace(name=f"eff-{seed}", seed=seed, **changes)), target)
            counts.append(spent)
            reached += ok
        medians[name] = statistics.median(counts)
        print(f"  {name:<38} median epochs {medians[name]:>6.0f}   reached target in {reached}/{args.seeds} seeds   {counts}")
    for space in ("sofim", "sofim-effective"):
        ratio = medians[f"random, no pruning / {space}"] / medians[f"tpe+hyperband / {space}"]
        print(f"  {space}: random without pruning needs {ratio:.2f}x the epochs of TPE + Hyperband")
    print("Seeds that never reached the target count every epoch they spent (a lower bound on their need).")


if __name__ == "__main__":
    main()
