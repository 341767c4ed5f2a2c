"""The foundation every stage may use: no torch, no zarr, no stage imports.

Errors, the vocabulary of names (variants, protocols, prediction names, the PCA default), the
store's key paths (`FeatureKey`), job-array shards and progress display live here so that the
scorer, the store and the readers can share one definition of each without importing torch or
one another. Import-linter contracts in `pyproject.toml` keep it that way.
"""
