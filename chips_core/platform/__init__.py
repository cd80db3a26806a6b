"""The data platform: the Parquet warehouse and its stored artefacts, input readers, Great
Expectations validation, provenance (the ``runs`` table), read-only SQL, the Delta publisher and the
HTML report. May import ``scoring``; never ``stages`` or ``flows``."""
