"""Running everything on one machine: the embedded broker and DynamoDB server (``embedded``), generated
traffic with exact ground truth (``traffic``) and the load generator (``loadgen``)."""
