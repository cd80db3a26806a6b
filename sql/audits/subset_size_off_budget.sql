-- audit: rows mean failure. A subset at budget r over N scored pairs holds exactly ceil(r * N) pairs.
with n_scored as (
    select run_id as score_run_id, count(*) as n from stg_scores group by run_id
),
sizes as (
    select subset_id, score_run_id, budget, count(*) as n_selected
    from stg_subsets group by subset_id, score_run_id, budget
)
select sizes.*, n_scored.n as n_scored, cast(ceil(sizes.budget * n_scored.n - 1e-9) as bigint) as expected
from sizes join n_scored using (score_run_id)
where sizes.n_selected != cast(ceil(sizes.budget * n_scored.n - 1e-9) as bigint)
