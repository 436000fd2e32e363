"""The Prometheus HTTP query API over the stored minutes: PromQL parsed by ``promql-parser``, evaluated here."""
