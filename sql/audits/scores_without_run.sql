-- audit: rows mean failure. Every scoring run id must have a runs row.
select distinct s.run_id
from stg_scores as s
left join stg_runs as r using (run_id)
where r.run_id is null
