"""Alert rules and the autoscaling model: pure state machines over closed minutes.

Nothing here touches Kafka, a clock or the network. Every decision is a function of the closed minutes
(event time: ``Minute.start_ms``) and of the state kept between them, so the Faust binding
(agents/alerts.py, agents/autoscale.py) replays the same decisions after a restart, and tests script
timelines minute by minute.

**Idempotence.** Input is at-least-once: a minute may arrive twice. Each monitor and policy keeps the
start of the last minute it applied and ignores minutes at or before it. Minutes of one (app, process
type) arrive in order; different process types may interleave, and each monitor only looks at its own.

``minute`` (the input), ``targets`` (who is notified), ``monitors`` (alerting), ``autoscale`` (the capacity
model and its rules), ``commands`` (configuration changes from the API and what applying them did).
"""
