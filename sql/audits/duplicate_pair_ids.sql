-- audit: rows mean failure. A pair id must appear once in pairs.
select pair_id, count(*) as n_rows
from stg_pairs
group by pair_id
having count(*) > 1
