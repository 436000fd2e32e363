"""minutely: observations -> per-minute aggregates -> store -> HTTP. Sub-packages by role (ingest, api,
storage, notify, ops, local); the Faust wiring, settings, CLI and shared contract live here."""
