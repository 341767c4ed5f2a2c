"""The extract and match stages spread over dask workers."""
