-- grain: one row per selected pair per subset, of materialize runs that succeeded only: a run killed midway leaves
-- parts that no reader sees (audit_subsets_without_succeeded_run lists them until `chips gc` removes them).
select subset_id, run_id, score_run_id, budget, method, pair_id, rank
from raw_subsets
where run_id in (select run_id from raw_runs where status = 'succeeded')
