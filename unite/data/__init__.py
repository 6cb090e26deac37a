"""Data: image-folder manifest (manifest.py), deterministic webdataset shards (shards.py), loaders
(loaders.py), decoding and the centre crop (image.py).

Typical use: write_manifest(root, manifest) -> write_shards(root, manifest, out_dir) ->
shard_loader(out_dir, batch_size). folder_loader reads the folder directly with the same
transform. The demo folder comes from unite.demo_data. The package imports none of its modules,
so that sharding never loads the training loaders (and a stage depends only on what it runs).
"""
