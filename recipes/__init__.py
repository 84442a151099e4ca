"""mxq's Hydra config root, importable as ``mxq.recipes`` so an installed wheel carries its recipes."""
