"""``python -m app.ops ensure-topics``: the Helm chart's worker init container."""

import sys

from app.ops.topics import main

sys.exit(main())
