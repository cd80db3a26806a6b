-- grain: one row per source key of one selected pair: from a subset row back to the scoring run,
-- its configuration, and the ingest runs and raw inputs the pair came from.
-- parameters: $subset_id, $pair_id
select
    sub.subset_id, sub.method, sub.budget, sub.rank as subset_rank,
    sc.utility, sc.chips_align, sc.w_learn, sc.w_relevance,
    score_run.run_id as score_run_id, score_run.config_json as score_config, score_run.config_hash as score_config_hash,
    score_run.model_checksum, score_run.bank_id, score_run.sketch_seed, score_run.sketch_k,
    score_run.input_fingerprints as score_inputs, score_run.code_version,
    ps.source, ps.source_key, ingest_run.run_id as ingest_run_id, ingest_run.input_fingerprints as ingest_inputs
from stg_subsets as sub
join stg_scores as sc on sc.pair_id = sub.pair_id and sc.run_id = sub.score_run_id
left join stg_runs as score_run on score_run.run_id = sub.score_run_id
left join stg_pair_sources as ps on ps.pair_id = sub.pair_id
left join stg_runs as ingest_run on ingest_run.run_id = ps.ingest_run_id
where sub.subset_id = $subset_id and sub.pair_id = $pair_id
order by ps.source, ps.source_key
