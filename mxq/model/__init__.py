"""mxq's GPT-OSS model: exact forward pass with packed experts."""
from .attention import set_attention_impl
from .cache import KVCache
from .gptoss import CausalLMOutput, GptOssForCausalLM
from .observe import MoEObserver, observe

__all__ = ["CausalLMOutput", "GptOssForCausalLM", "KVCache", "MoEObserver", "observe", "set_attention_impl"]
