"""Checkpoint I/O: strict streaming reader and atomic writer for the gpt-oss layouts."""
from .targets.hf import save_model
from .reader import Checkpoint, load_model, open_checkpoint
from .safetensors_io import CheckpointError
from .writer import AtomicFolder, write_checkpoint

__all__ = ["AtomicFolder", "Checkpoint", "CheckpointError", "load_model", "open_checkpoint", "save_model",
           "write_checkpoint"]
