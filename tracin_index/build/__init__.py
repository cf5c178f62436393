"""Building an index: settings, the plan, one task per shard file, and where the tasks run.

- :mod:`.settings`: what defines an index besides its inputs (:class:`~.settings.BuildSettings`).
- :mod:`.inputs`: the model, checkpoints and training triples, loaded and fingerprinted.
- :mod:`.rows`: the stored rows (training examples), their (head, relation) groups and the seeded sample.
- :mod:`.plan`: how each selected block is stored, the size estimate and the room check.
- :mod:`.bases`: each checkpoint's principal directions, fitted on the sample or read back.
- :mod:`.task`: one checkpoint x one range of rows -> one shard file (here or on a Dask worker).
- :mod:`.runners`: where the tasks run (this process, or a Dask cluster).
- :mod:`.builder`: the orchestration: lock, manifest, resume, reduce.
"""
