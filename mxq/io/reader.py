"""Strict, streaming checkpoint reader: ``load_model(source)`` for the HF and original gpt-oss layouts.

Order of work: (1) parse every header and the config, (2) check the complete tensor set against the
layout for that config (nothing missing, unexpected, mis-shaped or mis-typed), (3) only then read
tensors one at a time, moving each to the target device at once. MXFP4 experts stay packed; host
memory holds at most one tensor beyond what the model keeps (plus the OS page cache of the mmap).
"""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..config import ConfigError, GptOssConfig
from ..model import GptOssForCausalLM
from ..model.rope import Rope
from .layout import ORIGINAL_GLOBAL, ORIGINAL_TO_HF, check_tensors, hf_tensors, original_tensors
from .params import set_param
from .safetensors_io import CheckpointError, TensorInfo, read_json, scan_folder

NORM_SUFFIXES = ("layernorm.weight", "model.norm.weight")


@dataclass
class Checkpoint:
    folder: Path
    layout: str                     # "hf" or "original"
    experts: str                    # "mxfp4" or "bf16"
    config: GptOssConfig
    config_dict: dict
    tensors: dict[str, TensorInfo]


def resolve_source(source: str | Path) -> Path:
    """A folder path, or a preset name: ``tiny`` (the embedded model) or a gpt-oss name found locally."""
    from ..presets import resolve_preset_path

    p = Path(source).expanduser()
    if p.is_dir():
        return p
    found = resolve_preset_path(str(source))
    if found is not None:
        return found
    raise CheckpointError(f"{source}: not a folder and not an available preset. Pass the folder of a "
                          "checkpoint (HF gpt-oss layout or original/), or create a synthetic one with "
                          "`python -m mxq.synth OUT --preset gpt-oss-20b`.")


def open_checkpoint(source: str | Path, layout: str = "auto") -> Checkpoint:
    folder = resolve_source(source)
    if layout == "auto":
        if (folder / "config.json").exists() and any(folder.glob("*.safetensors")):
            cfg_d = read_json(folder / "config.json")
            layout = "original" if "num_experts" in cfg_d and "num_local_experts" not in cfg_d else "hf"
        elif (folder / "original" / "config.json").exists():
            folder, layout = folder / "original", "original"
        else:
            raise CheckpointError(f"{folder}: no config.json with *.safetensors, and no original/ folder")
    cfg_path = folder / "config.json"
    cfg_d = read_json(cfg_path)
    tensors = scan_folder(folder)
    try:
        if layout == "original":
            cfg = GptOssConfig.from_original_dict(cfg_d, str(cfg_path))
            experts = "mxfp4"
            expected = original_tensors(cfg)
        else:
            cfg = GptOssConfig.from_hf_dict(cfg_d, str(cfg_path))
            experts = "mxfp4" if any(n.endswith("_blocks") for n in tensors) else "bf16"
            qm = (cfg_d.get("quantization_config") or {}).get("quant_method")
            if experts == "mxfp4" and qm != "mxfp4":
                raise CheckpointError(f"{cfg_path}: tensors hold MXFP4 experts (*_blocks/*_scales) but config.json "
                                      f"has quantization_config.quant_method={qm!r}, not 'mxfp4'")
            if experts == "bf16" and qm is not None:
                raise CheckpointError(f"{cfg_path}: quantization_config.quant_method={qm!r} but the tensors hold "
                                      "unquantized experts (gate_up_proj/down_proj)")
            expected = hf_tensors(cfg, experts)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    check_tensors(tensors, expected, str(folder))
    return Checkpoint(folder, layout, experts, cfg, cfg_d, tensors)


class _Source:
    """Reads tensors by HF name from either layout, one at a time."""

    def __init__(self, ckpt: Checkpoint, stack: ExitStack):
        self.ckpt = ckpt
        self.handles = {}
        for info in ckpt.tensors.values():
            if info.file not in self.handles:
                self.handles[info.file] = stack.enter_context(safe_open(str(info.file), framework="pt"))
        self.q = ckpt.config.num_attention_heads * ckpt.config.head_dim
        self.kv = ckpt.config.num_key_value_heads * ckpt.config.head_dim

    def raw(self, name: str) -> torch.Tensor:
        info = self.ckpt.tensors[name]
        try:
            return self.handles[info.file].get_tensor(name)
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{info.file}: cannot read tensor {name!r}: {e}") from None

    def get(self, hf_name: str) -> torch.Tensor:
        if self.ckpt.layout == "hf":
            return self.raw(hf_name)
        inv = {v: k for k, v in ORIGINAL_GLOBAL.items()}
        if hf_name in inv:
            return self.raw(inv[hf_name])
        _, _, i, rest = hf_name.split(".", 3)                        # model.layers.{i}.{rest}
        for proj, (a, b) in {"q_proj": (0, self.q), "k_proj": (self.q, self.q + self.kv),
                             "v_proj": (self.q + self.kv, self.q + 2 * self.kv)}.items():
            if rest.startswith(f"self_attn.{proj}."):
                kind = rest.rsplit(".", 1)[1]
                return self.raw(f"block.{i}.attn.qkv.{kind}")[a:b].clone()
        orig = {v: k for k, v in ORIGINAL_TO_HF.items()}[rest]
        return self.raw(f"block.{i}.{orig}")


def load_model(source: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
               layout: str = "auto") -> GptOssForCausalLM:
    """Load a gpt-oss checkpoint into mxq's model, experts packed as stored (see module docstring)."""
    if layout == "auto" and (resolve_source(source) / "mxq_manifest.json").exists():   # mxq's own layout
        from .mxq_layout import load_mxq

        return load_mxq(resolve_source(source), device, dtype)
    ckpt = open_checkpoint(source, layout)
    cfg = ckpt.config
    device = torch.device(device)
    with torch.device("meta"):
        model = GptOssForCausalLM(cfg)

    def put(t: torch.Tensor, as_dtype: torch.dtype | None) -> torch.Tensor:
        t = t.to(device)
        return t.to(as_dtype) if as_dtype is not None else t

    with ExitStack() as stack:
        src = _Source(ckpt, stack)
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            set_param(model, name.removeprefix("model."), put(src.get(name), dtype))
        set_param(model, "norm.weight", put(src.get("model.norm.weight"), torch.float32))
        for i, layer in enumerate(model.layers):
            p = f"model.layers.{i}."
            for n in ("input_layernorm.weight", "post_attention_layernorm.weight"):
                set_param(layer, n, put(src.get(p + n), torch.float32))
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                for kind in ("weight", "bias"):
                    set_param(layer, f"self_attn.{proj}.{kind}", put(src.get(f"{p}self_attn.{proj}.{kind}"), dtype))
            set_param(layer, "self_attn.sinks", put(src.get(p + "self_attn.sinks"), dtype))
            set_param(layer, "mlp.router.weight", put(src.get(p + "mlp.router.weight"), dtype))
            set_param(layer, "mlp.router.bias", put(src.get(p + "mlp.router.bias"), dtype))
            ex = layer.mlp.experts
            set_param(ex, "gate_up_bias", put(src.get(p + "mlp.experts.gate_up_proj_bias"), dtype))
            set_param(ex, "down_bias", put(src.get(p + "mlp.experts.down_proj_bias"), dtype))
            for kind, hf in (("gate_up", "gate_up_proj"), ("down", "down_proj")):
                if ckpt.experts == "mxfp4":
                    ex.set_stacked(kind, "mxfp4", {
                        "blocks": put(src.get(f"{p}mlp.experts.{hf}_blocks"), None),   # [E, out, in/32, 16]
                        "scales": put(src.get(f"{p}mlp.experts.{hf}_scales"), None),   # [E, out, in/32]
                    }, {"axis": 1, "block": 32})
                else:
                    w = put(src.get(f"{p}mlp.experts.{hf}"), None)                      # [E, in, out] bf16
                    ex.set_stacked(kind, "bf16", {"weight": w.transpose(1, 2).contiguous()})  # [E, out, in]
    model.rope = Rope(cfg).to(device)
    leftover = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers() if b.is_meta]
    if leftover:  # a bug in the mapping, never a user error: fail loudly rather than run garbage
        raise CheckpointError(f"{ckpt.folder}: internal error, parameters not loaded: {leftover[:5]}")
    model.source, model.source_format = str(ckpt.folder), ckpt.experts
    model.eval()
    return model
