"""Search spaces shipped with sofim-tune (YAML), read through ``sofim_tune.space``."""
