-- grain: one row per stage run.
select
    run_id, parent_run_id, stage, status, config_json, config_hash, model_name, model_checksum,
    sketch_seed, sketch_k, bank_id, input_fingerprints,
    rows_in, rows_out, rows_quarantined, coalesce(rows_unchanged, 0) as rows_unchanged,
    diagnostics_json,
    code_version, host, started_at, ended_at, process
from raw_runs
