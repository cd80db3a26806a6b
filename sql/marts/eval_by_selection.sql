-- grain: one row per (eval run, suite, metric), joined to the selection (method, budget, scoring
-- run) whose subset trained the model; selection columns are null for models not trained on a subset.
with subset_meta as (
    select distinct subset_id, score_run_id, method, budget from stg_subsets
)
select e.run_id as eval_run_id, e.cpt_run_id, e.subset_id, s.score_run_id, s.method, s.budget,
       e.suite, e.metric, e.value, e.n, e.model_checkpoint
from stg_evals e
left join subset_meta s using (subset_id)
