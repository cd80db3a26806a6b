-- grain: one row per subset per source: how many of the source's scored pairs the subset selected.
with scored as (
    select s.run_id as score_run_id, s.pair_id, p.source
    from stg_scores as s
    join stg_pairs as p using (pair_id)
),
pool as (
    select score_run_id, source, count(*) as n_scored
    from scored
    group by score_run_id, source
),
chosen as (
    select sub.subset_id, sub.score_run_id, sub.method, sub.budget, sc.source, count(*) as n_selected
    from stg_subsets as sub
    join scored as sc on sc.pair_id = sub.pair_id and sc.score_run_id = sub.score_run_id
    group by sub.subset_id, sub.score_run_id, sub.method, sub.budget, sc.source
)
select
    subsets.subset_id, subsets.method, subsets.budget, pool.source, pool.n_scored,
    coalesce(chosen.n_selected, 0) as n_selected,
    coalesce(chosen.n_selected, 0) / pool.n_scored as selection_rate
from (select distinct subset_id, score_run_id, method, budget from stg_subsets) as subsets
join pool using (score_run_id)
left join chosen using (subset_id, source)
order by subsets.method, subsets.budget, pool.source
