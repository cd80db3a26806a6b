-- grain: one row per subset (method x budget): size and mean factors of the selected pairs.
select
    sub.score_run_id, sub.method, sub.budget, count(*) as n_selected,
    avg(s.utility) as mean_utility, avg(s.chips_align) as mean_align,
    avg(s.w_learn) as mean_w_learn, avg(s.w_relevance) as mean_w_relevance, avg(s.clipscore) as mean_clipscore
from stg_subsets as sub
join stg_scores as s on s.pair_id = sub.pair_id and s.run_id = sub.score_run_id
group by sub.score_run_id, sub.method, sub.budget
order by sub.method, sub.budget
