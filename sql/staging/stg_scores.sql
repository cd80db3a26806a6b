-- grain: one row per pair per scoring run.
select
    pair_id, run_id, random, clipscore, dot, trak, chips_align, chips_align_learn, chips, chips_plus,
    w_learn, w_relevance, utility, rank
from raw_scores
