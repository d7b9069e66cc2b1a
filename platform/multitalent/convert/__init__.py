"""The offline converter: raw NIfTI datasets -> preprocessed Zarr stores + WebDataset shards."""
