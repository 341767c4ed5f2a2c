"""The Zarr feature store (the only code that touches zarr) and what reads it back whole."""
