-- grain: one row per (eval run, suite, metric), joined to the selection (method, budget, scoring
-- run) whose subset trained the model. A model evaluated without CPT is method 'none' at budget 0 (the
-- reference beside 'full', the subset of every pair); a CPT run not trained on a subset has null selection.
with subset_meta as (
    select distinct subset_id, score_run_id, method, budget from stg_subsets
)
select e.run_id as eval_run_id, e.cpt_run_id, e.subset_id, s.score_run_id,
       case when e.cpt_run_id is null and e.subset_id is null then 'none' else s.method end as method,
       case when e.cpt_run_id is null and e.subset_id is null then 0.0 else s.budget end as budget,
       e.suite, e.metric, e.value, e.n, e.model_checkpoint
from stg_evals e
left join subset_meta s using (subset_id)
