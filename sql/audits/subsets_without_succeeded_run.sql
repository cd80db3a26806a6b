-- audit: rows mean failure. Every subset row belongs to a materialize run that succeeded (a killed or failed run's
-- parts are hidden from stg_subsets and removed by the next materialize or `chips gc`).
select s.run_id, count(*) as n_rows, any_value(r.status) as run_status
from raw_subsets as s
left join raw_runs as r using (run_id)
where r.status is null or r.status != 'succeeded'
group by s.run_id
