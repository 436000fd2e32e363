"""Stream jobs, one module each: aggregate (observations -> minutes), sink (minutes -> the store)."""
