-- grain: one row per scoring run per factor or score.
with long as (
    unpivot stg_scores
    on random, clipscore, dot, trak, chips_align, chips_align_learn, chips, chips_plus, w_learn, w_relevance
    into name factor value value
)
select
    run_id,
    factor,
    count(*) as n_pairs,
    avg(value) as mean,
    stddev_samp(value) as std,
    min(value) as min,
    quantile_cont(value, 0.5) as median,
    max(value) as max
from long
group by run_id, factor
order by run_id, factor
