"""Outgoing notifications: what a delivery is (``delivery``), how it is sent (``webhook``, ``email``) and the
background notifier that retries them (``notifier``)."""
