"""Queries: the scan that bounds every training triple's influence, refining, the loop that settles the
exact top k by rescoring candidates, the query engine, and search shards on a Dask cluster."""
