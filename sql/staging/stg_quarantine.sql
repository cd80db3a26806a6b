-- grain: one row per rejected input row.
select source, source_key, reason, detail, run_id
from raw_quarantine
