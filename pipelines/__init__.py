"""Data preprocessing: raw images -> center-cropped RGB -> VAE moments -> WebDataset shards."""
