"""Where default digits studies land against the best setting there is: sofim-tune against a plain Optuna script.

1. An exhaustive grid on digits (the study's own epochs, batch size and validation share), in
   SOFIM's natural coordinates: lr/rho (the step size while ||m_hat||^2 << rho) by quarter
   decades from 0.01 to 10, rho by decades from 1e-3 to 100, at beta1 = 0.9; and half decades
   of lr/rho at beta1 = 0.5 and 0.99. A quarter decade (x1.78) is finer than the lr x 2
   neighbourhood the selection looks at; rho by decades suffices, since along the good band
   the metric barely moves with rho (README, "How the recommendation is chosen"). Every point
   runs on ``--grid-seeds`` seeds, and the best mean is the grid optimum.
2. For each of ``--studies`` seeds S = 0, 1, ..., two studies:
   - sofim-tune as a user runs it: ``tune(spec.replace(seed=S), RunOptions(workers=1, ...))``,
     the digits default spec and the full protocol (search, confirmation, neighbours). A study
     is the same with any number of workers (README, "Reproducible studies"); one worker lets
     ``--jobs`` studies run side by side.
   - the plain Optuna script a user writes from Optuna's documentation (:func:`plain_optuna_study`):
     ``TPESampler(seed=S)``, ``HyperbandPruner()``, the spec's first settings enqueued, lr, rho
     (log) and beta1 over the ``sofim`` space's ranges, the spec's trials, ``n_jobs=1``, training
     through ``train_trial`` with the spec's epochs, batch size and split; it recommends
     ``study.best_params``. The study is named (``plain-S``): Hyperband picks a trial's bracket
     by hashing the study's name, and an unnamed study's random name would make its pruning,
     and these numbers, change from run to run.
3. The grid optimum and every recommended setting of both methods run again on ``--seeds`` fresh
   seeds, none used before, so that the optimum's own selection does not flatter it. The gap is
   the optimum's fresh mean minus the setting's, in points of accuracy (lower is better);
   "covers" says whether the interval sofim-tune's best.json reported holds the fresh mean.
4. Per method: the distribution of the gaps (median, 90th percentile, worst, how many within
   0.3 points) and the epochs it trained: for sofim-tune every epoch its search trials trained
   (pruned ones included) plus every confirmation and neighbour run (counted at the spec's
   epochs each) and its final runs; for the plain script every epoch its trials trained. A Markdown table sets the
   two side by side.
5. The ablation of sofim-tune's protocol: every confirmed candidate of every study is scored on
   the fresh seeds too, and each step's rule picks among them as it would have: the best search
   value (no confirmation: the search's epochs and the final runs only), the best confirmed mean
   (confirmation, no neighbours), and sofim-tune's rule (``selection.robust_score``: the mean
   unless the lr x 2 neighbour falls more than 2% below it). A study runs only the neighbours
   that could change its pick (``selection.confirm_top``), so rules that need every candidate's
   neighbour (the worse neighbour, or a mean smoothed over the neighbours) cannot be replayed
   here; the README records what they gave when every neighbour ran. One table row per rule,
   each with the epochs it needs (each pick is measured by the same final runs, which count for
   every rule).
6. The confirmation's budget: the best confirmed mean among the first 1, 2, ... candidates by
   search value, each over its first 2, 3, ... confirmation runs, with the epochs each needs
   (the search's, those runs' and the final runs').

7. With ``--calibration N`` (N = 30 for the figures in the README): each sofim-tune
   recommendation runs N more times on seeds and splits of their own, and its headline (best.json's
   mean and 95% interval) counts as agreeing when the two means differ by at most the combined 95%
   error of both: the interval's half-width and 1.96 standard errors of the N runs combined in
   quadrature. (Plain coverage of the N runs' mean by the interval would fall well short of 95% even
   for a perfect interval.) The average difference, headline minus further runs, shows selection
   bias, if any: the headline comes from the final runs, which played no part in the choice. A
   further run trains on a random 70% of the pool and validates on the other 30%, as a final run
   does on the study's final images.

``--arch cnn`` (a second problem) runs the two methods head to head instead, without the grid:
per seed, both recommendations on the same fresh seeds, and how many pairs sofim-tune wins or ties.
``--first-seed 10`` checks the protocol on studies other than those it was chosen on, and
``--pruner none`` lets every sofim-tune trial train to the end (the pruning budget's part), and
``--lookahead L`` changes how much of the study each trial's sampler and pruner see.

Every fresh and grid run draws its own train/validation split from its seed, as the confirmation
does: the numbers estimate what a setting gives on new data of this kind, which is what
best.json's interval is about, not its score on one fixed validation set (a fixed split is an
estimand of its own: on digits, split 0's validation images are easier than the average split).
Every run is seeded and single-threaded, so the numbers do not depend on ``--jobs`` or on load.

    OMP_NUM_THREADS=1 python benchmarks/recommendation_quality.py [--studies 10] [--seeds 5] [--grid-seeds 5] [--jobs 2]
    OMP_NUM_THREADS=1 python benchmarks/recommendation_quality.py --arch cnn --studies 5

Targets: sofim-tune within 0.3 points in at least 9 of 10 studies and never more than 0.5 points
below, training at most 1.5 times the plain script's epochs; every reported interval covers.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import os
import statistics
import tempfile
import time
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

# Small models gain nothing from intra-op threads; the pool runs one trial per core instead.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import optuna  # noqa: E402

from sofim_tune.choices import PRUNERS  # noqa: E402
from sofim_tune.recommend import load_recommendation  # noqa: E402
from sofim_tune.records import Confirmation  # noqa: E402
from sofim_tune.selection import robust_score  # noqa: E402
from sofim_tune.space import load_space  # noqa: E402
from sofim_tune.spec import StudySpec, load_spec  # noqa: E402
from sofim_tune.trial import TrialConfig, train_trial  # noqa: E402
from sofim_tune.tuning import RunOptions, tune  # noqa: E402

GRID_SEED_BASE = 2_000_000
FRESH_SEED_BASE = 3_000_000
CALIBRATION_SEED_BASE = 4_000_000
NEAR_POINTS = 0.3  # "within 0.3 points" of the grid optimum
WORST_POINTS = 0.5
NEAR_SHARE = 0.9  # of the studies that must be near
EPOCH_RATIO = 1.5  # sofim-tune's epochs over the plain script's, at most
PLAIN_SPACE = "sofim"
SOFIM_TUNE = "sofim-tune run --dataset digits --seed S"
PLAIN = "plain Optuna: TPE + Hyperband, best_params"


@dataclass(frozen=True)
class Pick:
    """What one study recommended and the epochs it trained to get there.

    ``reported`` is sofim-tune's confirmed mean and 95% interval (None for the plain script).
    """

    seed: int
    settings: dict[str, float]
    search_epochs: int
    after_epochs: int = 0
    final_epochs: int = 0
    reported: tuple[float, float, float] | None = None
    candidates: tuple[Candidate, ...] = ()


@dataclass(frozen=True)
class Candidate:
    """A confirmed candidate of a sofim-tune study: its confirmation, its search value, and the
    epochs its confirmation and neighbour runs trained."""

    confirmation: Confirmation
    search_value: float
    confirm_epochs: int
    neighbour_epochs: int

    @property
    def settings(self) -> dict[str, float]:
        return dict(self.confirmation.params)


# The ablation's rules: which candidate each picks, and which of its runs it needs.
def _by_search(c: Candidate) -> float:
    return c.search_value


def _by_mean(c: Candidate) -> float:
    return c.confirmation.mean


def _by_robust_score(c: Candidate) -> float:
    return robust_score(c.confirmation, "maximize")


RULES = {
    "best search value (no confirmation)": (_by_search, False, False),
    "best confirmed mean (no neighbours)": (_by_mean, True, False),
    "mean unless a neighbour falls > 2% (sofim-tune's rule)": (_by_robust_score, True, True),
}


def grid_points(quick: bool) -> list[dict[str, float]]:
    """The grid, as optimizer settings (see the module's docstring)."""
    rhos = [1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0]
    fine = [10 ** (-2 + i / 4) for i in range(13)]
    coarse = [10 ** (-2 + i / 2) for i in range(7)]
    if quick:
        rhos, fine, coarse = [1.0], [0.1, 1.0], [1.0]
    points = [{"lr": ratio * rho, "rho": rho, "beta1": 0.9} for ratio, rho in itertools.product(fine, rhos)]
    points += [{"lr": ratio * rho, "rho": rho, "beta1": beta1} for beta1 in (0.5, 0.99) for ratio, rho in itertools.product(coarse, rhos)]
    return points


def run_config(spec: StudySpec, settings: Mapping[str, float], seed: int, split_seed: int) -> TrialConfig:
    """One run of ``settings`` with the spec's training settings (as the spec's own trials train)."""
    return TrialConfig(
        dataset=spec.dataset, arch=spec.arch, optimizer="sofim", hyperparameters={**settings, "weight_decay": 0.0},
        epochs=spec.epochs, batch_size=spec.batch_size, seed=seed, device="cpu", val_fraction=spec.val_fraction, split_seed=split_seed,
    )


def accuracy(job: tuple[StudySpec, dict[str, float], int, bool]) -> float:
    """Validation accuracy of one run on a split of its own, or (``on_final_images``) on the
    study's final images as a final run; a diverged run scores 0."""
    spec, settings, seed, on_final_images = job
    config = run_config(spec, settings, seed, split_seed=spec.split_seed if on_final_images else seed)
    if on_final_images:
        config = dataclasses.replace(config, final_seed=spec.split_seed, final=True)
    result = train_trial(config)
    return result.metrics["val_accuracy"] if result.status == "completed" else 0.0


def accuracies(pool: ProcessPoolExecutor, spec: StudySpec, settings: list[dict[str, float]], seeds: list[int], *, on_final_images: bool = False) -> list[list[float]]:
    """Each setting's accuracy on each of ``seeds`` (one run, and one split, per seed; or
    every run on the study's final images)."""
    jobs = [(spec, s, seed, on_final_images) for s in settings for seed in seeds]
    values = list(pool.map(accuracy, jobs, chunksize=4))
    return [values[i * len(seeds) : (i + 1) * len(seeds)] for i in range(len(settings))]


def means(pool: ProcessPoolExecutor, spec: StudySpec, settings: list[dict[str, float]], seeds: list[int]) -> list[float]:
    """Each setting's mean accuracy over ``seeds``."""
    return [statistics.fmean(runs) for runs in accuracies(pool, spec, settings, seeds)]


def calibration(picks: list[Pick], runs: list[list[float]], same_images: list[list[float]]) -> str:
    """How well best.json's headline numbers predict further runs (see the module's docstring, step 7)."""
    lines = [
        f"\ncalibration: each headline mean against the mean of {len(runs[0])} further runs of its setting",
        "| study --seed | headline mean [95% interval] | further runs: mean ± standard error | difference (points) | agree | on the final images: mean, difference |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    differences, agreeing, widths, seeds_only = [], 0, [], []
    for pick, values, same in zip(picks, runs, same_images, strict=True):
        assert pick.reported is not None
        headline, low, high = pick.reported
        mean, error = statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))
        differences.append(100 * (headline - mean))
        widths.append(100 * (high - low))
        # Within the combined 95% error of both: the headline's half-width and 1.96 further standard errors.
        agree = abs(headline - mean) <= math.hypot((high - low) / 2, 1.96 * error)
        agreeing += agree
        seeds_only.append(100 * (headline - statistics.fmean(same)))
        lines.append(f"| {pick.seed} | {headline:.4f} [{low:.4f}, {high:.4f}] | {mean:.4f} ± {error:.4f} | {differences[-1]:+.2f} | {'yes' if agree else 'no'} | {statistics.fmean(same):.4f}, {seeds_only[-1]:+.2f} |")
    lines.append(
        f"agree in {agreeing} of {len(picks)} (target: at least {math.ceil(NEAR_SHARE * len(picks))}); average difference {statistics.fmean(differences):+.2f} points "
        f"(target: within ±0.1); average interval width {statistics.fmean(widths):.2f} points; "
        f"against further runs on the study's own final images (new seeds only): average difference {statistics.fmean(seeds_only):+.2f} points"
    )
    return "\n".join(lines)


def sofim_tune_study(spec: StudySpec) -> Pick:
    """sofim-tune's study of ``spec``, one worker and one thread (reproducible), as ``tune`` runs it."""
    with tempfile.TemporaryDirectory() as folder:
        outcome = tune(spec, RunOptions(out_dir=Path(folder), device="cpu", workers=1, threads_per_trial=1))
        rec = load_recommendation(outcome.best_json)
    runs_after = sum(len(c.values) + sum(len(runs) for runs in c.neighbours.values()) for c in outcome.study.confirmations)
    confirm = rec.metric.confirm
    search_values = {tuple(sorted(t.params.items())): t.value for t in outcome.study.completed()}
    candidates = tuple(
        Candidate(
            confirmation=c,
            search_value=search_values[tuple(sorted(c.params.items()))],  # type: ignore[arg-type]
            confirm_epochs=len(c.values) * spec.epochs,
            neighbour_epochs=sum(len(runs) for runs in c.neighbours.values()) * spec.epochs,
        )
        for c in outcome.study.confirmations
        if not c.final
    )
    return Pick(
        seed=spec.seed,
        settings=dict(rec.hyperparameters),
        search_epochs=sum(len(t.intermediate) for t in outcome.study.trials),
        after_epochs=runs_after * spec.epochs,
        final_epochs=sum(len(c.values) for c in outcome.study.confirmations if c.final) * spec.epochs,
        reported=(confirm.mean, *confirm.ci95),
        candidates=candidates,
    )


class PruningReporter:
    """Reports each epoch's accuracy to the Optuna trial and stops it when the pruner says so."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial

    def report(self, epoch: int, metrics: Mapping[str, float]) -> None:
        self.trial.report(metrics["val_accuracy"], epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned()


def plain_optuna_study(spec: StudySpec) -> Pick:
    """The Optuna script of Optuna's documentation: lr, rho and beta1 over the ``sofim`` space's
    ranges (the axes a user writes down), the spec's trials and first settings."""
    space = load_space(PLAIN_SPACE).params

    def objective(trial: optuna.Trial) -> float:
        settings = {
            "lr": trial.suggest_float("lr", space["lr"].low, space["lr"].high, log=True),
            "rho": trial.suggest_float("rho", space["rho"].low, space["rho"].high, log=True),
            "beta1": trial.suggest_float("beta1", space["beta1"].low, space["beta1"].high),
        }
        config = run_config(spec, settings, seed=spec.seed + trial.number, split_seed=spec.split_seed)
        result = train_trial(config, PruningReporter(trial))
        if result.status == "pruned":
            raise optuna.TrialPruned()
        return result.metrics["val_accuracy"] if result.status == "completed" else 0.0

    # Named: Hyperband puts a trial in a bracket by a hash of the study's name and the trial's
    # number, and an unnamed study gets a random name, so its pruning would change run to run.
    study = optuna.create_study(study_name=f"plain-{spec.seed}", direction="maximize", sampler=optuna.samplers.TPESampler(seed=spec.seed), pruner=optuna.pruners.HyperbandPruner())
    for settings in spec.enqueue:
        study.enqueue_trial(settings)
    study.optimize(objective, n_trials=spec.trials, n_jobs=1)
    return Pick(seed=spec.seed, settings=study.best_params, search_epochs=sum(len(t.intermediate_values) for t in study.trials))


def percentile(values: list[float], share: float) -> float:
    """The ``share`` quantile of ``values``, interpolated between the nearest ranks."""
    ordered = sorted(values)
    position = share * (len(ordered) - 1)
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


def summary_row(method: str, picks: list[Pick], gaps: list[float]) -> str:
    """The method's row of the side-by-side table for ``picks`` (studies in seed order): their
    seeds, the gaps' distribution and the epochs per study."""
    search = statistics.fmean(p.search_epochs for p in picks)
    after = statistics.fmean(p.after_epochs for p in picks)
    epochs = f"{search + after:.0f} per study ({search:.0f} search + {after:.0f} after)" if after else f"{search:.0f} per study (search only)"
    near = sum(gap <= NEAR_POINTS for gap in gaps)
    return f"| {method} | {picks[0].seed}–{picks[-1].seed} | {statistics.median(gaps):+.2f} | {percentile(gaps, 0.9):+.2f} | {max(gaps):+.2f} | {near} of {len(gaps)} | {epochs} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=10, help="studies per method, with --seed FIRST, FIRST + 1, ...")
    parser.add_argument("--first-seed", type=int, default=0, help="the first study's --seed (FIRST): other seeds check a protocol on studies it was not chosen on")
    parser.add_argument("--seeds", type=int, default=5, help="fresh seeds (and splits) each recommended setting is scored on")
    parser.add_argument("--grid-seeds", type=int, default=5, help="seeds per grid point")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes for the studies, the grid and the fresh runs")
    parser.add_argument("--quick", action="store_true", help="a tiny grid and tiny studies (the smoke test)")
    parser.add_argument("--calibration", type=int, default=0, help="further runs (30 for the README's figures) of each sofim-tune recommendation, against which its headline mean and interval are checked; 0 skips it")
    parser.add_argument("--arch", default="mlp", help="digits model; any other than mlp runs the two methods head to head on fresh seeds, without the grid")
    parser.add_argument("--pruner", choices=PRUNERS, help="pruner of the sofim-tune studies (default: the digits spec's, hyperband; none measures what pruning saves and costs); the plain script always uses Hyperband")
    parser.add_argument("--lookahead", type=int, help="lookahead of the sofim-tune studies (default: the digits spec's): a smaller one lets each trial's sampler and pruner see more of the study")
    parser.add_argument("--space", help="search space of the sofim-tune studies (default: the digits spec's, sofim-effective); the plain script always searches lr, rho and beta1")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial would bury the tables
    spec = load_spec("digits", args.arch)
    if args.quick:
        spec = spec.replace(trials=3, epochs=2, confirm_top=1, confirm_seeds=2)
    command = (
        f"OMP_NUM_THREADS=1 python benchmarks/recommendation_quality.py --studies {args.studies} --seeds {args.seeds}"
        + (f" --grid-seeds {args.grid_seeds}" if args.arch == "mlp" else f" --arch {args.arch}")
        + "".join(f" --{flag.replace('_', '-')} {value}" for flag, value in (("space", args.space), ("pruner", args.pruner), ("lookahead", args.lookahead), ("first_seed", args.first_seed), ("calibration", args.calibration)) if value)
        + (" --quick" if args.quick else "")
    )
    specs = [spec.replace(seed=seed) for seed in range(args.first_seed, args.first_seed + args.studies)]
    if args.arch != "mlp":
        head_to_head(specs, args.space, [FRESH_SEED_BASE + i for i in range(args.seeds)], args.jobs, command)
        return
    started = time.monotonic()
    with ProcessPoolExecutor(args.jobs) as pool:
        # Submitted first so that the studies, the longest jobs, overlap the grid's runs.
        sofim_tune_futures = [pool.submit(sofim_tune_study, s.replace(search_space=args.space, pruner=args.pruner, lookahead=args.lookahead)) for s in specs]
        plain_futures = [pool.submit(plain_optuna_study, s) for s in specs]
        points = grid_points(args.quick)
        grid_means = means(pool, spec, points, [GRID_SEED_BASE + i for i in range(args.grid_seeds)])
        optimum = points[max(range(len(points)), key=grid_means.__getitem__)]
        print(f"grid: {len(points)} points x {args.grid_seeds} seeds; optimum {_short(optimum)} at {max(grid_means):.4f} ({time.monotonic() - started:.0f} s)")
        methods = {SOFIM_TUNE: [f.result() for f in sofim_tune_futures], PLAIN: [f.result() for f in plain_futures]}
        fresh_seeds = [FRESH_SEED_BASE + i for i in range(args.seeds)]
        candidates = [c.settings for p in methods[SOFIM_TUNE] for c in p.candidates]
        fresh = means(pool, spec, [optimum] + [p.settings for picks in methods.values() for p in picks] + candidates, fresh_seeds)
        candidate_means = dict(zip((_key(c) for c in candidates), fresh[len(fresh) - len(candidates) :]))
        calibration_seeds = [CALIBRATION_SEED_BASE + i for i in range(args.calibration)]
        further = accuracies(pool, spec, [p.settings for p in methods[SOFIM_TUNE]], calibration_seeds) if args.calibration else []
        same_images = accuracies(pool, spec, [p.settings for p in methods[SOFIM_TUNE]], calibration_seeds, on_final_images=True) if args.calibration else []

    print(f"fresh seeds: {args.seeds}; grid optimum's fresh mean {fresh[0]:.4f}")
    fresh_means = iter(fresh[1 : len(fresh) - len(candidates)])
    gaps: dict[str, list[float]] = {}
    for method, picks in methods.items():
        print(f"\n{method}: one row per study")
        sofim = method == SOFIM_TUNE
        print("| study --seed | recommendation | fresh mean | gap (points) | epochs trained |" + (" reported mean [95% interval] | covers |" if sofim else ""))
        print("| --- | --- | --- | --- | --- |" + (" --- | --- |" if sofim else ""))
        gaps[method], covered = [], []
        for pick, mean in zip(picks, fresh_means):
            gaps[method].append(100 * (fresh[0] - mean))
            row = f"| {pick.seed} | {_short(pick.settings)} | {mean:.4f} | {gaps[method][-1]:+.2f} | {pick.search_epochs + pick.after_epochs} |"
            if pick.reported is not None:
                reported, low, high = pick.reported
                covered.append(low <= mean <= high)
                row += f" {reported:.4f} [{low:.4f}, {high:.4f}] | {'yes' if covered[-1] else 'no'} |"
            print(row)
        near = sum(gap <= NEAR_POINTS for gap in gaps[method])
        print(
            f"median gap {statistics.median(gaps[method]):+.2f}, 90th percentile {percentile(gaps[method], 0.9):+.2f}, worst {max(gaps[method]):+.2f} points; "
            f"within {NEAR_POINTS} points: {near} of {len(picks)}; epochs trained: {sum(p.search_epochs + p.after_epochs for p in picks)} in all"
            + (f"; intervals covering: {sum(covered)}/{len(covered)}" if sofim else "")
        )

    print("\n| method | seeds | median gap | p90 | worst | within 0.3 pp | epochs trained |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    # All studies, then each ten of them apart: a protocol chosen on seeds 0-9 is checked on the next ten.
    blocks = [range(args.studies)] + ([range(i, min(i + 10, args.studies)) for i in range(0, args.studies, 10)] if args.studies > 10 else [])
    for method, picks in methods.items():
        for block in blocks:
            print(summary_row(method, [picks[i] for i in block], [gaps[method][i] for i in block]))
    print(f"\ngaps in points below the grid optimum's mean on {args.seeds} fresh seeds and splits; command: {command}")
    print(ablation(methods[SOFIM_TUNE], candidate_means, fresh[0]))
    print(budget_ablation(methods[SOFIM_TUNE], candidate_means, fresh[0], spec.epochs))
    if further:
        print(calibration(methods[SOFIM_TUNE], further, same_images))
    ours, plain = gaps[SOFIM_TUNE], methods[PLAIN]
    needed = math.ceil(NEAR_SHARE * len(ours))
    ratio = sum(p.search_epochs + p.after_epochs for p in methods[SOFIM_TUNE]) / max(1, sum(p.search_epochs for p in plain))
    print(
        f"targets for sofim-tune: within {NEAR_POINTS} points in at least {needed} of {len(ours)} ({_met(sum(g <= NEAR_POINTS for g in ours) >= needed)}); "
        f"none beyond {WORST_POINTS} ({_met(max(ours) <= WORST_POINTS)}); epochs at most {EPOCH_RATIO}x the plain script's: {ratio:.2f}x ({_met(ratio <= EPOCH_RATIO)}); "
        f"{time.monotonic() - started:.0f} s in all"
    )


def head_to_head(specs: list[StudySpec], space: str | None, fresh_seeds: list[int], jobs: int, command: str) -> None:
    """Both methods on each spec (one pair of studies per seed), each recommendation scored on
    ``fresh_seeds``: per pair, which is better, and how many pairs sofim-tune wins or ties."""
    started = time.monotonic()
    with ProcessPoolExecutor(jobs) as pool:
        ours = [pool.submit(sofim_tune_study, s.replace(search_space=space)) for s in specs]
        plain = [pool.submit(plain_optuna_study, s) for s in specs]
        pairs = [(a.result(), b.result()) for a, b in zip(ours, plain)]
        fresh = means(pool, specs[0], [p.settings for pair in pairs for p in pair], fresh_seeds)
    print(f"digits {specs[0].arch}: head to head, each recommendation's mean on {len(fresh_seeds)} fresh seeds and splits")
    print("| study --seed | sofim-tune | fresh mean | epochs | plain Optuna | fresh mean | epochs | sofim-tune minus plain (points) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    differences = []
    for (mine, theirs), my_mean, their_mean in zip(pairs, fresh[::2], fresh[1::2]):
        differences.append(100 * (my_mean - their_mean))
        print(f"| {mine.seed} | {_short(mine.settings)} | {my_mean:.4f} | {mine.search_epochs + mine.after_epochs} | {_short(theirs.settings)} | {their_mean:.4f} | {theirs.search_epochs} | {differences[-1]:+.2f} |")
    at_least = sum(d >= 0 for d in differences)
    ratio = sum(m.search_epochs + m.after_epochs for m, _ in pairs) / max(1, sum(t.search_epochs for _, t in pairs))
    print(
        f"sofim-tune at least as good in {at_least} of {len(pairs)} pairs (target: most, {_met(2 * at_least > len(pairs))}); "
        f"mean difference {statistics.fmean(differences):+.2f} points; epochs {ratio:.2f}x the plain script's; {time.monotonic() - started:.0f} s; command: {command}"
    )


def ablation(picks: list[Pick], fresh_means: Mapping[tuple[tuple[str, float], ...], float], optimum_mean: float) -> str:
    """The ablation table (see the module's docstring, step 5): per rule, the gaps of what it picks
    and the epochs per study it needs (the final runs that measure its pick included)."""
    lines = ["\nablation: each step's rule picking among the same confirmed candidates", "| rule | median gap | p90 | worst | within 0.3 pp | epochs per study |", "| --- | --- | --- | --- | --- | --- |"]
    for rule, (score, confirms, neighbours) in RULES.items():
        gaps, epochs = [], []
        for pick in picks:
            chosen = max(pick.candidates, key=score)
            gaps.append(100 * (optimum_mean - fresh_means[_key(chosen.settings)]))
            epochs.append(pick.search_epochs + sum(c.confirm_epochs * confirms + c.neighbour_epochs * neighbours for c in pick.candidates) + pick.final_epochs)
        near = sum(gap <= NEAR_POINTS for gap in gaps)
        lines.append(f"| {rule} | {statistics.median(gaps):+.2f} | {percentile(gaps, 0.9):+.2f} | {max(gaps):+.2f} | {near} of {len(gaps)} | {statistics.fmean(epochs):.0f} |")
    return "\n".join(lines)


def budget_ablation(picks: list[Pick], fresh_means: Mapping[tuple[tuple[str, float], ...], float], optimum_mean: float, epochs: int) -> str:
    """How many candidates and seeds the confirmation needs (see the module's docstring, step 6):
    per (candidates, seeds), the gaps of the best confirmed mean among the ``candidates`` best by
    search value, each over its first ``seeds`` confirmation runs, and the epochs per study."""
    lines = ["\nconfirmation budget: the best confirmed mean among the top candidates, over their first seeds", "| candidates | seeds | median gap | p90 | worst | within 0.3 pp | epochs per study |", "| --- | --- | --- | --- | --- | --- | --- |"]
    most = max(len(p.candidates) for p in picks)
    seeds = min(len(c.confirmation.values) for p in picks for c in p.candidates)
    for top, count in itertools.product(range(1, most + 1), sorted({s for s in (2, 3, seeds) if s <= seeds})):
        gaps, trained = [], []
        for pick in picks:
            shortlist = pick.candidates[:top]
            chosen = max(shortlist, key=lambda c: statistics.fmean(c.confirmation.values[:count]))
            gaps.append(100 * (optimum_mean - fresh_means[_key(chosen.settings)]))
            trained.append(pick.search_epochs + len(shortlist) * count * epochs + pick.final_epochs)
        near = sum(gap <= NEAR_POINTS for gap in gaps)
        lines.append(f"| {top} | {count} | {statistics.median(gaps):+.2f} | {percentile(gaps, 0.9):+.2f} | {max(gaps):+.2f} | {near} of {len(gaps)} | {statistics.fmean(trained):.0f} |")
    return "\n".join(lines)


def _key(settings: Mapping[str, float]) -> tuple[tuple[str, float], ...]:
    return tuple(sorted(settings.items()))


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _short(settings: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:.3g}" for k, v in settings.items())


if __name__ == "__main__":
    main()
