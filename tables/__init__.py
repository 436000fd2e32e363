"""Window and digest state: Digest, Aggregate (one mergeable bucket), PartitionWindows (lifecycle), table binding,
and the stored record (record.py)."""
