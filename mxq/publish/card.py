"""The model card of an export: ``<run>/model/README.md``, a Hugging Face model card built from the run's files.

Built with ``huggingface_hub``'s ``ModelCard`` / ``ModelCardData`` (offline: nothing here touches the network)
from what the run wrote: ``resolved_config.yaml`` (the source), ``plan.json`` (experts kept, formats, bytes),
``metrics.json`` (only the numbers that were measured, with their intervals when the run computed them) and
the exported folder itself (which layout, hence which engines load it). Because the card is rebuilt from
files, ``python -m mxq.publish.card RUN_DIR`` writes it again for any finished run.

Metadata follows the Hub's model-card specification (huggingface.co/docs/hub/model-cards, "Specifying a
base model"): ``base_model``, ``base_model_relation`` (only the Hub's own values: ``quantized`` when any
weight changed format, ``merge`` when experts were merged; a pruning that keeps every format has no Hub value,
so the field is left out), ``library_name: mxq``, ``tags``, ``license`` carried over from the source's card.
What mxq did is always stated in full under the ``mxq`` key (``operations``, plan summary, what the numbers
were measured on).
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from ..atomic import write_atomic

# model.name (when no model.path is given) -> the Hub id of the published checkpoint it stands for
HUB_IDS = {"gpt-oss-20b": "openai/gpt-oss-20b", "gpt-oss-120b": "openai/gpt-oss-120b"}
SYNTHETIC_MARKER = "mxq_synthetic.json"     # written by mxq.synth into every synthetic checkpoint
EMBEDDED = (Path(__file__).resolve().parents[1] / "assets" / "tiny").resolve()

TEMPLATE = """---
{{ card_data }}
---

{{ body }}
"""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); the model card is built from it") from e


def _get(d: Any, dotted: str) -> Any:
    for k in dotted.split("."):
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def source_of(cfg: dict) -> dict[str, Any]:
    """What the run compressed: ``{"base_model", "path", "kind"}``; kind is embedded, synthetic or real."""
    m = cfg.get("model") or {}
    name, path = m.get("name"), m.get("path")
    if path is None:
        if name == "tiny":
            return {"base_model": "mxq-tiny", "path": str(EMBEDDED), "kind": "embedded"}
        return {"base_model": HUB_IDS.get(name, name), "path": None, "kind": "real"}
    p = Path(path)
    if p.resolve() == EMBEDDED:
        return {"base_model": "mxq-tiny", "path": str(p), "kind": "embedded"}
    kind = "synthetic" if (p / SYNTHETIC_MARKER).is_file() else "real"
    return {"base_model": str(path), "path": str(p), "kind": kind}


KIND_TEXT = {
    "embedded": "mxq's embedded reference model (`mxq/assets/tiny`, a small GPT-OSS trained on English text)",
    "synthetic": "a synthetic checkpoint with random weights in the gpt-oss layout (`python -m mxq.synth`): "
                 "its quality numbers say nothing about a trained model",
    "real": "the checkpoint named as base model",
}


def source_license(src_path: str | None) -> str | None:
    """The ``license`` of the source's own model card (README.md front matter), if it has one."""
    if not src_path:
        return None
    readme = Path(src_path) / "README.md"
    if not readme.is_file() or not readme.read_text(errors="replace").startswith("---"):
        return None          # no front matter, no license (and no warning from huggingface_hub about it)
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(readme).data.to_dict().get("license")
    except (ValueError, yaml.YAMLError):     # broken front matter carries no license
        return None


def operations(plan: dict, source_format: str | None) -> list[str]:
    """What the plan did to the source: pruned, merged, quantized (any weight in a new format)."""
    ops = []
    if any(f == "prune" for row in plan["experts"] for f in row):
        ops.append("pruned")
    if "merge" in str(plan.get("planner", "")):
        ops.append("merged")
    kept = {f for row in plan["experts"] for f in row if f != "prune"}
    if kept - {source_format} or plan.get("attention", "bf16") != "bf16" or plan.get("lm_head", "bf16") != "bf16":
        ops.append("quantized")
    return ops


def relation(ops: list[str]) -> str | None:
    """The Hub's ``base_model_relation`` value (adapter, merge, quantized, finetune) that fits, or None."""
    if "merged" in ops:
        return "merge"
    if "quantized" in ops:
        return "quantized"
    return None


def layout_of(model_dir: Path) -> str:
    if (model_dir / "mxq_manifest.json").is_file():
        return "mxq"
    cfg = _read_json(model_dir / "config.json") or {}
    return "hf-mxfp4" if (cfg.get("quantization_config") or {}).get("quant_method") == "mxfp4" else "hf-bf16"


def plan_tables(plan: dict) -> str:
    """Experts kept per layer and the formats of each layer, one row per layer (compact: counts per format)."""
    rows = ["| layer | experts kept | formats (experts) | pruned (source index) |", "|---|---|---|---|"]
    for i, row in enumerate(plan["experts"]):
        fmts = Counter(f for f in row if f != "prune")
        pruned = [j for j, f in enumerate(row) if f == "prune"]
        rows.append(f"| {i} | {sum(fmts.values())} / {len(row)} | "
                    f"{', '.join(f'{f} ({n})' for f, n in sorted(fmts.items()))} | "
                    f"{', '.join(map(str, pruned)) or '-'} |")
    return "\n".join(rows)


def bytes_table(plan: dict) -> str:
    after, before = (plan.get("info") or {}).get("bytes") or {}, (plan.get("info") or {}).get("source_bytes") or {}
    if not after:
        return ""
    rows = ["| component | source bytes | exported bytes |", "|---|---:|---:|"]
    for k, v in after.items():
        if k == "expert_bits":
            continue
        b = before.get(k)
        rows.append(f"| {k} | {b:,} | {v:,} |" if b is not None else f"| {k} | - | {v:,} |")
    if "expert_bits" in after:
        rows.append(f"| bits per expert weight (scales included) | {before.get('expert_bits', '-')} | "
                    f"{after['expert_bits']} |")
    return "\n".join(rows)


# (label, value path, interval path) of the headline metrics; a row appears only when the value was measured
METRICS: tuple[tuple[str, str, str | None], ...] = (
    ("perplexity, mean over domains", "accuracy.perplexity.mean", "accuracy.perplexity_ci.mean"),
    ("KL(baseline ‖ this), mean, nats", "accuracy.kl_vs_baseline.mean", "accuracy.kl_vs_baseline.mean_ci"),
    ("KL p99, nats", "accuracy.kl_vs_baseline.p99", None),
    ("top-1 agreement with the baseline", "accuracy.kl_vs_baseline.top1_agreement",
     "accuracy.kl_vs_baseline.top1_agreement_ci"),
    ("weight bytes as held in memory (at the dtype above)", "memory.weight_bytes", None),
    ("bits per expert weight", "memory.bits_per_expert_weight", None),
    ("decode tokens/s", "speed.decode_tokens_per_s", None),
    ("time to first token, s", "speed.ttft_s", None),
)


def _num(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.4g}"


def measured(metrics: dict) -> dict[str, float]:
    """The headline numbers the run measured, keyed by their path in metrics.json."""
    return {path: v for _, path, _ in METRICS
            if isinstance(v := _get(metrics, path), (int, float)) and not isinstance(v, bool)}


def metrics_table(metrics: dict) -> str:
    conf = _get(metrics, "accuracy.intervals.confidence")
    rows = ["| metric | value | interval |", "|---|---:|---|"]
    for label, path, ci_path in METRICS:
        v = _get(metrics, path)
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        ci = _get(metrics, ci_path) if ci_path else None
        ci_s = (f"[{_num(ci[0])}, {_num(ci[1])}]" + (f" ({conf:.0%} bootstrap)" if conf else "")
                if isinstance(ci, (list, tuple)) and len(ci) == 2 and None not in ci else "-")
        rows.append(f"| {label} | {_num(v)} | {ci_s} |")
    return "\n".join(rows) if len(rows) > 2 else ""


def load_commands(layout: str, model_dir: Path, run_dir: Path) -> str:
    """Commands for the engines that load this folder (or a form the run also wrote) as it is."""
    p = "path/to/model"
    out = []
    if layout == "hf-mxfp4":
        out += ["transformers (MXFP4 kernels on a supported GPU; on other devices dequantized to bf16):", "```python",
                "from transformers import AutoModelForCausalLM, AutoTokenizer, Mxfp4Config",
                f"tok = AutoTokenizer.from_pretrained(\"{p}\")",
                (f"model = AutoModelForCausalLM.from_pretrained(\"{p}\", "
                "quantization_config=Mxfp4Config(dequantize=True), torch_dtype=\"bfloat16\")"), "```",
                "vLLM:", "```bash", f"vllm serve {p}", "```"]
    elif layout == "hf-bf16":
        out += ["transformers:", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                f"tok = AutoTokenizer.from_pretrained(\"{p}\")",
                f"model = AutoModelForCausalLM.from_pretrained(\"{p}\", torch_dtype=\"bfloat16\")", "```",
                "vLLM:", "```bash", f"vllm serve {p}", "```"]
    else:
        out += [("This folder is in mxq's own layout (per-expert formats that transformers, vLLM and llama.cpp do not "
                "read); `config.json` is a guard that makes transformers refuse it instead of loading random "
                "experts. Load it with mxq, or convert it:"), "```python", "import mxq",
                f"model = mxq.load_model(\"{p}\")", "tok = mxq.load_tokenizer(model.source)", "```",
                "A standard bf16 checkpoint for transformers and vLLM (every expert rounded to bf16 once):",
                "```bash", f"python -m mxq.dequantize {p} {p}-bf16", "```"]
    if layout != "mxq":
        out += ["mxq:", "```python", "import mxq", f"model = mxq.load_model(\"{p}\")", "```"]
    if (run_dir / "model.gguf").is_file():
        out += ["llama.cpp (the run also wrote `model.gguf` beside this folder):", "```bash",
                "llama-cli -m model.gguf -p \"Hello\"", "```"]
    elif layout == "hf-mxfp4":
        out += ["llama.cpp reads GGUF; this folder converts without re-rounding any expert:", "```bash",
                f"python -m mxq.convert {p} --to gguf --out model.gguf", "```"]
    return "\n".join(out)


def build_card(run_dir: str | Path):
    """The ``huggingface_hub.ModelCard`` of ``run_dir/model`` from the run's files."""
    from huggingface_hub import ModelCard, ModelCardData

    from .. import __version__

    run_dir = Path(run_dir)
    model_dir = run_dir / "model"
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: no exported model (recipe.export.enabled=false?); nothing to card")
    plan = _read_json(run_dir / "plan.json")
    if plan is None:
        raise FileNotFoundError(f"{run_dir / 'plan.json'}: missing; the card describes the plan it was exported with")
    cfg_path = run_dir / "resolved_config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else {}
    metrics = _read_json(run_dir / "metrics.json") or {}
    src = source_of(cfg)
    env = metrics.get("env") or {}
    source_format = _source_format(src["path"])
    ops = operations(plan, source_format)
    layout = layout_of(model_dir)
    recipe = (cfg.get("recipe") or {}).get("name") or (plan.get("recipe") or {}).get("name")
    summ = {"planner": plan.get("planner"), "num_layers": len(plan["experts"]),
            "num_experts": len(plan["experts"][0]) if plan["experts"] else 0,
            "num_kept": sum(f != "prune" for f in plan["experts"][0]) if plan["experts"] else 0,
            "formats": dict(sorted(Counter(f for row in plan["experts"] for f in row if f != "prune").items())),
            "attention": plan.get("attention"), "lm_head": plan.get("lm_head")}
    b_after = (plan.get("info") or {}).get("bytes") or {}
    b_before = (plan.get("info") or {}).get("source_bytes") or {}
    for k, d in (("bytes", b_after), ("source_bytes", b_before)):
        if "total" in d:
            summ[k] = d["total"]
    if "expert_bits" in b_after:
        summ["bits_per_expert_weight"] = b_after["expert_bits"]
    meas = measured(metrics)
    info = {"recipe": recipe, "operations": ops, "layout": layout, "plan": summ,
            "measured_on": src["kind"] if meas else None, "metrics": meas or None,
            "version": env.get("mxq") or __version__, "git_revision": env.get("git_revision")}
    tags = ["mxq", "gpt-oss", "mixture-of-experts", *ops, *summ["formats"]]
    lic = source_license(src["path"])
    data = ModelCardData(base_model=src["base_model"], base_model_relation=relation(ops), library_name="mxq",
                         tags=list(dict.fromkeys(tags)), license=lic, pipeline_tag="text-generation", mxq=info)
    body = _body(run_dir, model_dir, plan, metrics, src, ops, layout, recipe, info, lic)
    card = ModelCard.from_template(data, template_str=TEMPLATE, body=body)
    return card


def _source_format(path: str | None) -> str | None:
    """The source's expert format (mxfp4 when its config says so, else bf16), or None if unreadable."""
    if not path:
        return None
    cfg = _read_json(Path(path) / "config.json")
    if cfg is None:
        return None
    if (cfg.get("quantization_config") or {}).get("quant_method") == "mxfp4":
        return "mxfp4"
    return "bf16"


def _body(run_dir: Path, model_dir: Path, plan: dict, metrics: dict, src: dict, ops: list[str], layout: str,
          recipe: str | None, info: dict, lic: str | None) -> str:
    s = info["plan"]
    did = " and ".join(ops) if ops else "re-exported without changing any weight"
    parts = [f"# {src['base_model']}: {did} with mxq (recipe `{recipe}`)", "",
             f"Base model: `{src['base_model']}`"
             + (f" (read from `{src['path']}`)" if src["path"] and src["path"] != src["base_model"] else "") + ".",
             f"mxq {info['version']}" + (f", git revision `{info['git_revision']}`" if info["git_revision"] else "")
             + f"; planner `{s['planner']}`; layout `{layout}` (docs/export.md of mxq).",
             "" if lic else "No license was found in the source's model card; none is carried over.", "",
             "## What was done", "",
             f"{s['num_kept']} of {s['num_experts']} experts kept in each of {s['num_layers']} layers; "
             f"attention `{s['attention']}`, lm_head `{s['lm_head']}`; expert formats: "
             + ", ".join(f"`{f}` x {n}" for f, n in s["formats"].items()) + ".", "",
             plan_tables(plan), ""]
    bt = bytes_table(plan)
    if bt:
        parts += ["Bytes of every stored tensor (exact, from each format's packed size):", "", bt, ""]
    if plan.get("notes"):
        parts += [f"The plan records {len(plan['notes'])} note(s) on its decisions (`plan.json`, `notes`).", ""]
    parts += ["## Measured", ""]
    mt = metrics_table(metrics)
    if mt:
        ev = metrics.get("evaluated") or {}
        how = ("the exported folder reloaded from disk by `mxq.load_model`" if ev.get("reloaded_from_disk")
               else "the in-memory model")
        parts += [f"Measured on {KIND_TEXT[src['kind']]}; evaluated: {how}; device "
                  f"`{_get(metrics, 'model.device')}`, dtype `{_get(metrics, 'model.dtype')}`, code path "
                  f"`{_get(metrics, 'speed.code_path') or _get(metrics, 'precision.path')}`"
                  + (f", CPU `{_get(metrics, 'env.cpu')}`" if not _get(metrics, "env.gpu")
                     else f", GPU `{_get(metrics, 'env.gpu')}`") + ". Preset: `"
                  + str(_get(metrics, "eval.preset")) + "`.", "", mt, ""]
    else:
        parts += ["No quality or speed number was measured in this run (evaluation was off); none is reported.", ""]
    ev = metrics.get("evaluated") or {}
    checked = ["`mxq.load_model` read every shard header and accounted for every tensor when the run reloaded "
               "the folder" if ev.get("reloaded_from_disk") else "not reloaded by the run"]
    if layout == "mxq":
        checked.append("`mxq_manifest.json` records every shard's SHA-256; `mxq publish` (`mxq.io.mxq_layout.verify`) "
                       "checks them before an upload")
    parts += ["## How the files were checked", "", *[f"- {c}" for c in checked],
              "- engines other than mxq were not run on this folder by the run", "",
              "## Load", "", load_commands(layout, model_dir, run_dir), "",
              "## Reproduce", "", "```bash", "python -m mxq.run " + " ".join(_overrides(run_dir, recipe, src)), "```", "",
              "The full configuration is `resolved_config.yaml` in the run folder; the plan is `plan.json`."]
    return "\n".join(parts)


def _overrides(run_dir: Path, recipe: str | None, src: dict) -> list[str]:
    """The command-line overrides of the run (Hydra's ``.hydra/overrides.yaml``), else recipe and model path."""
    f = run_dir / ".hydra" / "overrides.yaml"
    if f.is_file():
        over = [o for o in (yaml.safe_load(f.read_text()) or []) if not str(o).startswith("hydra.")]
        if over:
            return [str(o) for o in over]
    return [f"recipe={recipe}"] + ([f"model.path={src['path']}"] if src["path"] and src["kind"] != "embedded" else [])


def write_card(run_dir: str | Path) -> Path:
    """Write ``run_dir/model/README.md`` atomically; returns its path."""
    card = build_card(run_dir)
    path = Path(run_dir) / "model" / "README.md"
    write_atomic(path, str(card))
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m mxq.publish.card", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    print(write_card(ap.parse_args(argv).run_dir))


if __name__ == "__main__":
    main()
