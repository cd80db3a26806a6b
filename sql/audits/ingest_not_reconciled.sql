-- audit: rows mean failure. For every ingest run: read = kept + quarantined + unchanged, and the
-- quarantine table holds exactly rows_quarantined rows for it.
with q as (
    select run_id, count(*) as n_quarantine_rows from stg_quarantine group by run_id
)
select r.run_id, r.rows_in, r.rows_out, r.rows_quarantined, r.rows_unchanged, coalesce(q.n_quarantine_rows, 0) as n_quarantine_rows
from stg_runs as r
left join q using (run_id)
where r.stage = 'ingest' and r.status = 'succeeded'
  and (r.rows_in != r.rows_out + r.rows_quarantined + r.rows_unchanged
       or r.rows_quarantined != coalesce(q.n_quarantine_rows, 0))
