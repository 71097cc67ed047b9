"""Adapter I/O: one in-memory adapter state, two file formats (native safetensors, Hugging Face PEFT)."""
from lora_edu.adapters.files import load_adapter, save_adapter
from lora_edu.adapters.native import read_adapter_config
from lora_edu.adapters.state import AdapterFileError

__all__ = ["AdapterFileError", "load_adapter", "read_adapter_config", "save_adapter"]
