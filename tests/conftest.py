"""Shared test setup: no hub access, ever (a hub id would otherwise cost 30 s of retries)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
