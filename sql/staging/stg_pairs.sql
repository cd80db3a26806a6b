-- grain: one row per distinct pair (first source seen). Rename and cast only; no image bytes.
select
    pair_id,
    source,
    source_key,
    caption,
    image_uri,
    image_sha256,
    cast(width as integer) as width,
    cast(height as integer) as height,
    image_format,
    ingest_run_id
from raw_pairs
