"""Study specs shipped with sofim-tune (TOML), read through ``sofim_tune.spec``."""
