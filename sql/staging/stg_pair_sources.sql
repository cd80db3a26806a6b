-- grain: one row per (pair, source, source key) ever ingested.
select pair_id, source, source_key, ingest_run_id
from raw_pair_sources
