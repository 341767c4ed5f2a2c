"""The Zarr feature store: the only code that touches zarr, and it imports no stage.

One concern per module:

* `feature_store`: `FeatureStore`, the facade one opens (and the public names other stages use);
* `layout`: the names of the store's nodes and the one walker over them;
* `schema`: codecs, chunking, dtypes, and how each new node is built;
* `arrays`, `prompts`: the views of a feature key, a predictions group, the prompt cache;
* `backend_interface`: the typed interface of where a store lives (below every user of it);
* `backends`: its implementations (`local` folder, `object` store, `published`) and `--store` parsing;
* `store_access`: what the schema-migration and prompt-cache helpers need of a store (a protocol
  `FeatureStore` satisfies, so they do not import it);
* `locks` (POSIX locks), `leases` (object-store leases), `writers` (this process among a
  store's writers, and the consolidated metadata the last one writes);
* `legacy`: stores of older schemas, read as they are and migrated;
* `audit`, `doctor`: what `ditf doctor` checks and repairs in a store;
* `faults`: the crash tests' kill points, installed only when armed by its environment;
* `failures`: how a failure becomes one error line.
"""
