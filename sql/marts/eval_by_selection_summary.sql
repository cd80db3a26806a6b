-- grain: one row per (base model, method, budget, suite, metric): the evaluations of mart_eval_by_selection
-- grouped, with how many there are, over how many CPT seeds and scoring seeds, their mean and spread. A cold and a
-- warmed base model are separate rows, their 'none' references too.
select base_model_checksum, method, budget, suite, metric,
       count(*) as evals, count(distinct cpt_seed) as cpt_seeds, count(distinct score_seed) as score_seeds,
       avg(value) as mean, stddev_samp(value) as sd, min(value) as min, max(value) as max
from mart_eval_by_selection
group by all
