"""The write side: one encode pipeline (plan → global selections → per-shard encode → commit) whose
per-shard work runs in this process or on a Dask cluster. Nothing on the read side imports it."""
