"""Trials per minute of the default digits study, this checkout against another one, side by side.

Each run is a fresh process that imports sofim_tune from one checkout and runs the search of
``sofim-tune run --dataset digits`` (the spec's trials, default workers and threads, no
confirmation or report) in a temporary folder. The two checkouts take turns, ``--rounds`` times,
so that a noisy neighbour hits both alike; the medians and their ratio are printed, in trials
per minute and in epochs trained per second (two searches that prune differently train
different numbers of epochs per trial).

    git worktree add /tmp/before <commit>     # the release to compare with
    python benchmarks/release_throughput.py /tmp/before [--rounds 4] [--trials N] [--epochs N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent

# Run in a child process with the checkout first on sys.path; prints one JSON line.
ONE_STUDY = """
import json, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import optuna
import sofim_tune
assert sofim_tune.__file__.startswith(sys.argv[1]), sofim_tune.__file__
from sofim_tune.spec import load_spec
from sofim_tune.study import RunOptions
from sofim_tune.tuning import tune
optuna.logging.set_verbosity(optuna.logging.WARNING)
with tempfile.TemporaryDirectory() as folder:
    started = time.perf_counter()
    spec = load_spec("digits").replace(trials=json.loads(sys.argv[2]), epochs=json.loads(sys.argv[3]))
    outcome = tune(spec, RunOptions(out_dir=Path(folder) / "run", device="cpu", export=False))
    seconds = time.perf_counter() - started
trials = [t for t in outcome.study.trials if t.state in ("complete", "pruned")]
print(json.dumps({"trials": len(trials), "epochs": sum(len(t.intermediate) for t in outcome.study.trials), "seconds": seconds, "parallelism": outcome.parallelism}))
"""


def one_study(checkout: Path, trials: int | None, epochs: int | None) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", ONE_STUDY, str(checkout), json.dumps(trials), json.dumps(epochs)], capture_output=True, text=True, check=True, timeout=1200)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("other", type=Path, help="the other checkout (a git worktree of the release to compare with)")
    parser.add_argument("--rounds", type=int, default=4, help="studies per checkout, taking turns")
    parser.add_argument("--trials", type=int, default=None, help="trials of each study (default: the spec's)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of each trial (default: the spec's)")
    args = parser.parse_args()
    checkouts = {"other": args.other.resolve(), "this": HERE}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in checkouts}
    for _ in range(args.rounds):
        for name, checkout in checkouts.items():
            run = one_study(checkout, args.trials, args.epochs)
            runs[name].append(run)
            print(f"{name} ({checkout}): {run['trials']} trials, {run['epochs']} epochs in {run['seconds']:.1f} s; {run['parallelism']}", flush=True)
    medians = {}
    for name, results in runs.items():
        per_minute = statistics.median(60 * r["trials"] / r["seconds"] for r in results)
        per_second = statistics.median(r["epochs"] / r["seconds"] for r in results)
        medians[name] = (per_minute, per_second)
        print(f"{name}: median {per_minute:.0f} trials/min, {per_second:.1f} epochs/s over {len(results)} studies")
    (this_minute, this_second), (other_minute, other_second) = medians["this"], medians["other"]
    print(f"this / other: {this_minute / other_minute:.2f}x trials per minute, {this_second / other_second:.2f}x epochs per second")


if __name__ == "__main__":
    main()
