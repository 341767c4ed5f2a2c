"""ditf: Diffusion Transformer Features (DiTF), extracted once, cached in Zarr, matched and scored.

The package mirrors the data flow: `datasets` (readers) -> `models` (one adapter per DiT family)
-> `extract` -> `store` (the only module that touches Zarr) -> `features` (variants computed
from the cache) -> `match` -> `score` -> `report`.
"""

__version__ = "0.1.0"
SCHEMA_VERSION = 2
