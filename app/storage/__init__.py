"""What the service stores and where: the store protocols (``protocol``), their backends side by side
(``dynamodb``, ``cassandra``) and the registry that makes them (``backends``), how events are kept
(``events``), and the small tables (``tokens``)."""
