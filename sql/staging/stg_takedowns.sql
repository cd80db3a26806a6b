-- grain: one row per takedown key per pair it matched; honoured = it matched a pair (left out of later subsets).
select run_id, listed_in, kind, key, pair_id, reason, pair_id is not null as honoured
from raw_takedowns
