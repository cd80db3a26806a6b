-- grain: one row per metric per suite per evaluated model.
select run_id, cpt_run_id, subset_id, model_checkpoint, model_checksum, suite, metric, value, n
from raw_evals
