"""Alert rules and the autoscaling model: pure state machines over closed minutes.

No Kafka, clock or network: every decision is a function of the minutes (event time) and the state kept
between them, and a minute at or before the last one applied is ignored, so a replay decides the same.
``minute`` (the input), ``targets``, ``monitors``, ``autoscale``, ``commands``.
Reference: docs/alerting.md
"""
