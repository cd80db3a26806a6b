-- grain: one row per selected pair per subset.
select subset_id, run_id, score_run_id, budget, method, pair_id, rank
from raw_subsets
