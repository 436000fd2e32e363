"""Operating the service: readiness and Prometheus endpoints (``health``), the counter catalogue
(``stats``), JSON logs (``logs``), Kafka client settings (``kafka``) and topic creation (``topics``)."""
