-- grain: one row per rejected input row. `cause` is the word the run summary and the errors use: the reason, and for
-- a read_error whose detail starts with a name (missing_image_file: ..., path_outside_root: ...) that name too
-- (the same expression as platform/poolscan.py's quarantine_causes, which reads the parts without these views).
select source, source_key, reason, detail, run_id,
       case when reason = 'read_error'
                 and regexp_full_match(split_part(coalesce(detail, ''), ':', 1), '[A-Za-z_][A-Za-z0-9_]*')
            then 'read_error (' || split_part(detail, ':', 1) || ')' else reason end as cause
from raw_quarantine
