"""The one exception the run store raises: every message names the store, model, site or shard."""


class StoreError(RuntimeError):
    """A run store is missing, of another schema, locked by another writer, or asked for bad data."""
