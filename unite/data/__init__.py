"""Data: image-folder manifest, deterministic webdataset shards, and loaders.

Typical use: write_manifest(root, manifest) -> write_shards(root, manifest, out_dir) ->
shard_loader(out_dir, batch_size). folder_loader reads the folder directly with the same
transform. The demo folder comes from unite.demo_data.
"""

from unite.data.errors import DataError
from unite.data.image import center_crop, decode, to_rgb
from unite.data.loaders import Batch, FolderDataset, Loader, ShardStream, folder_loader, shard_loader
from unite.data.manifest import Manifest, list_image_folder, read_manifest, write_manifest
from unite.data.shards import read_index, read_shard, shard_name, shard_plan, write_shards

__all__ = [
    "Batch",
    "DataError",
    "FolderDataset",
    "Loader",
    "Manifest",
    "ShardStream",
    "center_crop",
    "decode",
    "folder_loader",
    "list_image_folder",
    "read_index",
    "read_manifest",
    "read_shard",
    "shard_loader",
    "shard_name",
    "shard_plan",
    "to_rgb",
    "write_manifest",
    "write_shards",
]
