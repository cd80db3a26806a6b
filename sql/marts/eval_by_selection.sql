-- grain: one row per (eval run, suite, metric), joined to the selection (method, budget, scoring
-- run) whose subset trained the model and to the runs that made it. A model evaluated without CPT is method 'none'
-- at budget 0 (the reference beside 'full', the subset of every pair), one per base model; a CPT run trained on a
-- manifest is method 'manifest:<file name>', a warm-up round (`chips warmup`) 'warmup:<warmup run>'.
-- `base_model_checksum` is the model CPT started from (for 'none': the model itself), `model_checksum` the
-- evaluated checkpoint's; `cpt_seed` and `score_seed` (the scoring run's random seed) tell repeated runs apart.
with subset_meta as (
    select distinct subset_id, score_run_id, method, budget from stg_subsets
),
cpt_runs as (
    select run_id as cpt_run_id, model_checksum as start_checksum,
           try_cast(json_extract_string(config_json, '$.cpt.seed') as integer) as cpt_seed,
           json_extract_string(input_fingerprints, '$.manifest') as manifest,
           json_extract_string(input_fingerprints, '$.warmup') as warmup
    from stg_runs where stage = 'cpt'
),
score_runs as (
    select run_id as score_run_id,
           try_cast(json_extract_string(config_json, '$.score.random_seed') as integer) as score_seed
    from stg_runs where stage in ('score', 'rescore')
)
select e.run_id as eval_run_id, e.cpt_run_id, e.subset_id, s.score_run_id,
       case when e.cpt_run_id is null and e.subset_id is null then 'none'
            when s.method is null and c.manifest is not null
                then 'manifest:' || regexp_extract(c.manifest, '[^/\\]+$')
            when s.method is null and c.warmup is not null then 'warmup:' || c.warmup
            else s.method end as method,
       case when e.cpt_run_id is null and e.subset_id is null then 0.0 else s.budget end as budget,
       e.suite, e.metric, e.value, e.n, e.model_checkpoint, e.model_checksum,
       coalesce(c.start_checksum, e.model_checksum) as base_model_checksum,
       c.cpt_seed, r.score_seed
from stg_evals e
left join subset_meta s using (subset_id)
left join cpt_runs c on c.cpt_run_id = e.cpt_run_id
left join score_runs r on r.score_run_id = s.score_run_id
