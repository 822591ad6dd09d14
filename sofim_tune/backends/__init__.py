"""Search backends: Optuna (default) and Ray Tune. Both turn a SearchSpace into trials of train_trial."""
