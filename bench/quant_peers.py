"""Peer quantizers for ``quant_compare.py``, run in a Python where llm-compressor / auto-round are installed.

    PY bench/quant_peers.py --src BF16_CKPT --calib calib.pt --method llmc_gptq|llmc_rtn|autoround --out W.safetensors

Loads the bf16 HF checkpoint in float32 with transformers, quantizes only the experts (attention, router
and lm_head stay as they are, as in mxq's recipes) to symmetric INT4 with groups of ``--group`` using each
tool's defaults otherwise, on the given calibration windows, and writes the fake-quantized expert weights
(fp32, mxq's [out, in] orientation, gate/up interleaved): ``layers.{i}.gate_up`` [E, 2I, H] and
``layers.{i}.down`` [E, H, I]. Prints one JSON line (tool, version, seconds, share of weights on a
16-level grid per group).

* llm-compressor (``oneshot``): ``GPTQModifier`` (``llmc_gptq``) or ``QuantizationModifier`` (``llmc_rtn``)
  with a config group of 4-bit int, symmetric, group strategy; its MoE path linearizes the gpt-oss experts.
  ``moe_calibrate_all_experts=False``: each expert is calibrated on its routed tokens, as mxq's GPTQ (the
  tool's default, every token through every expert, costs 8x the compute: over an hour on a 2-core CPU).
* AutoRound (``autoround``): ``AutoRound(bits=4, group_size, sym=True, iters=200)`` (Cheng et al.,
  arXiv 2309.05516), attention projections excluded through ``layer_config``.
"""
from __future__ import annotations

import argparse
import json
import re
import time

import torch

EXPERT = re.compile(r"layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)$")


def _expert_linears(model) -> dict[tuple[int, int, str], torch.nn.Module]:
    out = {}
    for name, mod in model.named_modules():
        m = EXPERT.search(name)
        if m and isinstance(mod, torch.nn.Linear):
            out[(int(m.group(1)), int(m.group(2)), m.group(3))] = mod
    return out


def _fake_quant_weight(mod: torch.nn.Module) -> torch.Tensor:
    """The weight as the tool's quantized model computes with it (compressed-tensors fake quantization)."""
    w = mod.weight.detach().float()
    scheme = getattr(mod, "quantization_scheme", None)
    if scheme is not None and getattr(mod, "weight_scale", None) is not None:
        from compressed_tensors.quantization.lifecycle.forward import fake_quantize

        zp = getattr(mod, "weight_zero_point", None)
        w = fake_quantize(mod.weight.detach(), mod.weight_scale, zp, scheme.weights).float()
    return w


def _on_grid(w: torch.Tensor, group: int) -> float:
    """Share of groups with at most 16 distinct values (a 4-bit grid)."""
    g = w.reshape(-1, group)
    n = sum(int(torch.unique(r).numel() <= 16) for r in g)
    return n / g.shape[0]


def _collect(model, cfg, group: int) -> tuple[dict[str, torch.Tensor], float]:
    lin = _expert_linears(model)
    L, E = cfg.num_hidden_layers, cfg.num_local_experts
    if len(lin) != 3 * L * E:
        raise SystemExit(f"found {len(lin)} expert linears, expected {3 * L * E}")
    out, grid = {}, []
    for i in range(L):
        gu, dn = [], []
        for e in range(E):
            g, u, d = (_fake_quant_weight(lin[(i, e, k)]) for k in ("gate_proj", "up_proj", "down_proj"))
            both = torch.empty(2 * g.shape[0], g.shape[1])
            both[0::2], both[1::2] = g, u                                                # [2I, H] interleaved
            gu.append(both)
            dn.append(d)
            grid += [_on_grid(g, group), _on_grid(d, group)]
        out[f"layers.{i}.gate_up"] = torch.stack(gu).contiguous()
        out[f"layers.{i}.down"] = torch.stack(dn).contiguous()
    return out, sum(grid) / len(grid)


def run_llmc(model, calib, group: int, gptq: bool) -> str:
    import llmcompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=True, strategy="group", group_size=group))
    ignore = ["lm_head", "re:.*self_attn.*", "re:.*router.*"]
    mod = (GPTQModifier if gptq else QuantizationModifier)(config_groups={"group_0": scheme}, ignore=ignore)
    ds = Dataset.from_dict({"input_ids": calib["input_ids"].tolist(), "attention_mask": calib["attention_mask"].tolist()})
    oneshot(model=model, dataset=ds, recipe=[mod], num_calibration_samples=len(ds),
            max_seq_length=calib["input_ids"].shape[1], moe_calibrate_all_experts=False)
    return llmcompressor.__version__


def run_autoround(model, tok, calib, group: int) -> str:
    import auto_round
    from auto_round import AutoRound

    data = [calib["input_ids"][i:i + 1] for i in range(calib["input_ids"].shape[0])]
    skip = {n: {"bits": 16} for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ("self_attn" in n or n.endswith("lm_head"))}
    ar = AutoRound(model, tok, bits=4, group_size=group, sym=True, dataset=data, seqlen=calib["input_ids"].shape[1],
                   nsamples=len(data), iters=200, batch_size=8, layer_config=skip, device_map="cpu")
    ar.quantize()
    return auto_round.__version__


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--method", choices=["llmc_gptq", "llmc_rtn", "autoround"], required=True)
    ap.add_argument("--group", type=int, default=32)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.src, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.src)
    calib = torch.load(args.calib)
    t0 = time.perf_counter()
    if args.method == "autoround":
        version, tool = run_autoround(model, tok, calib, args.group), "auto-round"
    else:
        version, tool = run_llmc(model, calib, args.group, args.method == "llmc_gptq"), "llm-compressor"
    seconds = time.perf_counter() - t0
    weights, grid = _collect(model, model.config, args.group)
    save_file(weights, args.out)
    print(json.dumps({"tool": f"{tool} {args.method}", "version": version, "seconds": seconds, "on_grid": grid}))


if __name__ == "__main__":
    main()
