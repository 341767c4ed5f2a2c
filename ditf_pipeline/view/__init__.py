"""`ditf view`: a local web app that explores correspondences straight from the feature store.

`queries` holds the pure computations (heatmaps, argmax, per-pair PCK, plots as PNG bytes),
`explorer` the read-only session state and its caches, `uploads` the user's own image pairs,
and `app` the thin FastAPI layer. Only `app` imports FastAPI (the optional ``[view]`` extra),
so the core install never needs it.
"""
