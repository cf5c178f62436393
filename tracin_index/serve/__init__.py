"""``tracin-index serve``: an index kept warm behind a JSON API and the explorer (:mod:`.app`, ``static/``)."""
