"""Metrics-as-a-service pipeline: wiring, settings, models, store, web and commands."""
