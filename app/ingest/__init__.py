"""The HTTP ingestion edge: Logplex drains and the JSON API (``server``), the drain parser (``logplex``) and
frame deduplication shared by every ingest process (``dedup``)."""
