"""``python -m mxq.synth OUT --preset ... --experts {mxfp4,bf16} --seed N [--device cuda]``.

Random-weight checkpoints in the exact published layout (tensor names, shapes and dtypes of the
Hub's gpt-oss ``model.safetensors.index.json``; see mxq/io/layout.py), for running mxq at full scale
without the real weights. Scales are chosen so that activations stay finite through every layer and
routing is spread over the experts (unit-variance pre-activations, router logits of std ~1); every
tensor has its own seed, so the same arguments give the same bytes on the same device type.
"""
from __future__ import annotations

import argparse
import json
import time
import zlib
from pathlib import Path
from typing import Iterator

import torch

from .config import GptOssConfig
from .formats.mxfp4 import quantize_mxfp4
from .io.targets.hf import original_tensor_stream
from .io.writer import MXFP4_QUANT_CONFIG, write_checkpoint, write_shards
from .options import positive_int
from .presets import preset_config

TOKENIZER_KIND = {"tiny": "tiny", "gpt-oss-20b": "o200k_harmony", "gpt-oss-120b": "o200k_harmony"}


class _Rand:
    def __init__(self, seed: int, device: torch.device):
        self.seed, self.device = seed, device

    def normal(self, name: str, shape: tuple[int, ...], std: float, mean: float = 0.0) -> torch.Tensor:
        g = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        t = torch.randn(shape, generator=g, device=self.device, dtype=torch.float32)
        return t.mul_(std).add_(mean)


def synth_stream(cfg: GptOssConfig, experts: str, seed: int, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named tensors, one layer at a time (bf16 on the CPU; MXFP4 experts as u8 blocks/scales)."""
    r = _Rand(seed, device)
    H, I, E, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.vocab_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim

    def bf(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.bfloat16).cpu()

    yield "model.embed_tokens.weight", bf(r.normal("embed", (V, H), 1.0))
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", bf(r.normal(p + "ln1", (H,), 0.05, 1.0))
        for proj, out_d, in_d in (("q_proj", q, H), ("k_proj", kv, H), ("v_proj", kv, H), ("o_proj", H, q)):
            std = in_d ** -0.5 * (0.5 if proj == "o_proj" else 1.0)
            yield f"{p}self_attn.{proj}.weight", bf(r.normal(p + proj, (out_d, in_d), std))
            yield f"{p}self_attn.{proj}.bias", bf(r.normal(p + proj + ".b", (out_d,), 0.02))
        yield p + "self_attn.sinks", bf(r.normal(p + "sinks", (cfg.num_attention_heads,), 1.0))
        yield p + "post_attention_layernorm.weight", bf(r.normal(p + "ln2", (H,), 0.05, 1.0))
        yield p + "mlp.router.weight", bf(r.normal(p + "router", (E, H), H ** -0.5))
        yield p + "mlp.router.bias", bf(r.normal(p + "router.b", (E,), 0.1))
        for kind, out_d, in_d, std in (("gate_up_proj", 2 * I, H, H ** -0.5), ("down_proj", H, I, 0.5 * I ** -0.5)):
            w = r.normal(p + kind, (E, out_d, in_d), std).to(torch.bfloat16)              # [E, out, in]
            if experts == "mxfp4":
                blocks, scales = quantize_mxfp4(w)                                          # [E,out,in/32,16], [E,out,in/32]
                del w
                yield f"{p}mlp.experts.{kind}_blocks", blocks.cpu()
                yield f"{p}mlp.experts.{kind}_scales", scales.cpu()
            else:
                yield f"{p}mlp.experts.{kind}", w.transpose(1, 2).contiguous().cpu()       # [E, in, out]
                del w
            yield f"{p}mlp.experts.{kind}_bias", bf(r.normal(p + kind + ".b", (E, out_d), 0.02))
    yield "model.norm.weight", bf(r.normal("norm", (H,), 0.05, 1.0))
    yield "lm_head.weight", bf(r.normal("lm_head", (V, H), H ** -0.5))


def synth(out: str | Path, preset: str = "tiny", experts: str = "mxfp4", seed: int = 0, device: str = "cpu",
          with_original: bool = False, overrides: dict | None = None, overwrite: bool = False,
          shard_bytes: int | None = None) -> Path:
    """Write a synthetic checkpoint; ``overrides`` changes config fields (e.g. fewer layers for tests)."""
    from .tokenizer import write_tokenizer_files

    if experts not in ("mxfp4", "bf16"):
        raise ValueError(f"--experts must be mxfp4 or bf16, got {experts!r}")
    cfg_d = preset_config(preset)
    cfg_d.update(overrides or {})
    if "num_hidden_layers" in (overrides or {}) and "layer_types" not in (overrides or {}):
        cfg_d.pop("layer_types")
    cfg = GptOssConfig.from_hf_dict(cfg_d)
    hf = cfg.to_hf_dict()
    if experts == "mxfp4":
        hf["quantization_config"] = dict(MXFP4_QUANT_CONFIG)
    dev = torch.device(device)
    from .io.targets.hf import generation_config

    subdirs = {}
    if with_original:
        if experts != "mxfp4":
            raise ValueError("--with-original needs --experts mxfp4 (the original layout stores MXFP4 experts)")

        def write_original(folder: Path) -> None:
            write_shards(folder, original_tensor_stream(synth_stream(cfg, "mxfp4", seed, dev)), shard_bytes or 4 * 1024**3)
            (folder / "config.json").write_text(json.dumps(cfg.to_original_dict(), indent=2) + "\n")

        subdirs["original"] = write_original
    kw = {} if shard_bytes is None else {"shard_bytes": shard_bytes}

    def with_tokenizer(folder: Path) -> None:
        write_tokenizer_files(folder, TOKENIZER_KIND[preset])
        # marks the weights as random, so a model card never presents numbers measured on them as a model's
        (folder / "mxq_synthetic.json").write_text(json.dumps({"preset": preset, "experts": experts, "seed": seed,
                                                               "overrides": overrides or {}}, indent=2) + "\n")

    subdirs["."] = with_tokenizer
    return write_checkpoint(out, hf, synth_stream(cfg, experts, seed, dev), None, generation_config(cfg),
                            overwrite=overwrite, subdir_files=subdirs, **kw)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m mxq.synth", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--preset", default="tiny", choices=sorted(TOKENIZER_KIND))
    ap.add_argument("--experts", default="mxfp4", choices=["mxfp4", "bf16"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--with-original", action="store_true", help="also write original/ (OpenAI layout)")
    ap.add_argument("--layers", type=positive_int, default=None, help="override num_hidden_layers")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace OUT if it is a checkpoint made only of files mxq writes (anything else is refused)")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    over = {"num_hidden_layers": a.layers} if a.layers is not None else None
    path = synth(a.out, a.preset, a.experts, a.seed, a.device, a.with_original, over, a.overwrite)
    n = sum(1 for _ in json.loads((path / "model.safetensors.index.json").read_text())["weight_map"])
    print(f"wrote {path} ({n} tensors) in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
