"""Package data: the pinned price table (prices.json)."""
