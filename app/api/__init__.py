"""The read side: HTTP routes (``web``), the query engine and its caches (``query``), the OpenAPI document,
the monitors/autoscaling policies API (``policies``) and the dashboard's static files."""
