"""What the service stores and where: the store protocol (``protocol``), its backends (``dynamodb``), how
events are kept (``events``), and the small tables (``tokens``)."""
