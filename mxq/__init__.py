"""mxq: compress GPT-OSS Mixture-of-Experts models per expert, exactly and measurably."""
from .config import GptOssConfig
from .formats import Packed, get_format, list_formats, register_format
from .io import CheckpointError, load_model, save_model
from .model import GptOssForCausalLM, observe

__version__ = "0.1.0"


def load_tokenizer(source):
    """The tokenizer of a checkpoint folder or preset (offline); see ``mxq.tokenizer``."""
    from .io.reader import resolve_source
    from .io.safetensors_io import CheckpointError as _Missing
    from .tokenizer import load_tokenizer as _load

    try:
        return _load(resolve_source(source))
    except _Missing:          # a preset name whose checkpoint is absent still has a tokenizer
        return _load(source)


__all__ = ["CheckpointError", "GptOssConfig", "GptOssForCausalLM", "Packed", "get_format", "list_formats",
           "load_model", "load_tokenizer", "observe", "register_format", "save_model", "__version__"]
