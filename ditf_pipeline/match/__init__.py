"""The match stage: feature variants from the cache, matchers, and the per-benchmark drivers."""
