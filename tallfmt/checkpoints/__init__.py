"""Checkpoint I/O: readers of the files users have (safetensors, Hugging Face folders, torch files,
dicts) and writers of the models tallfmt gives back (safetensors files and Hugging Face folders)."""

from tallfmt.checkpoints.readers import Checkpoint, open_checkpoint
from tallfmt.checkpoints.writers import SafetensorsWriter, save_safetensors, save_state_dict

__all__ = ["Checkpoint", "open_checkpoint", "SafetensorsWriter", "save_safetensors", "save_state_dict"]
