"""The model card written into every export: parsed back by huggingface_hub, metadata equal to the plan and
to the measured metrics, nothing reported that was not measured."""
from __future__ import annotations

import json
from collections import Counter

import pytest
from huggingface_hub import ModelCard

from mxq.publish.card import build_card, operations, relation
from mxq.run import run
from tests.test_recipes import compose_cfg

FAST = ("eval=none", "calib.num_sequences=8", "calib.seq_len=64", "generate.max_new_tokens=0")
# a cheap evaluation: held-out perplexity and KL on a few tokens, no speed sweep, no lm-eval
LIGHT_EVAL = ("eval=quick", "eval.speed.enabled=false", "eval.lm_eval.enabled=false", "eval.memory.measure_peak=false",
              "eval.perplexity.max_tokens=64", "eval.perplexity.max_length=64", "eval.perplexity.stride=64",
              "calib.num_sequences=8", "calib.seq_len=64", "generate.max_new_tokens=0")


@pytest.fixture(scope="module")
def ckpt(make_ckpt, tmp_path_factory):
    path = make_ckpt("mxfp4", layers=2)
    (path / "README.md").write_text("---\nlicense: apache-2.0\n---\n\n# a source card\n")
    return path


CASES = {   # name -> (overrides, operations, Hub relation)
    "baseline_export": (("recipe=baseline", "recipe.planner=uniform", "recipe.export.enabled=true", *FAST), [], None),
    "nf4": (("recipe=nf4", *LIGHT_EVAL), ["quantized"], "quantized"),
    "prune_25pct": (("recipe=prune_25pct", *FAST), ["pruned"], None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_card_in_export_matches_plan_and_metrics(case, ckpt, tmp_path):
    overrides, ops, rel = CASES[case]
    out = tmp_path / "run"
    run(compose_cfg(*overrides, f"model.path={ckpt}", f"cache_dir={tmp_path / 'cache'}"), out)
    card = ModelCard.load(out / "model" / "README.md")
    meta = card.data.to_dict()
    plan = json.loads((out / "plan.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert meta["base_model"] == str(ckpt) and meta["library_name"] == "mxq"
    assert meta["license"] == "apache-2.0"                              # carried over from the source's card
    assert meta.get("base_model_relation") == rel
    m = meta["mxq"]
    assert m["operations"] == ops and set(ops) <= set(meta["tags"])
    formats = Counter(f for row in plan["experts"] for f in row if f != "prune")
    assert m["plan"]["formats"] == dict(formats)
    assert m["plan"]["num_kept"] == metrics["plan"]["num_kept"] == plan["num_kept"]
    assert m["plan"]["bytes"] == plan["info"]["bytes"]["total"]
    assert m["plan"]["source_bytes"] == plan["info"]["source_bytes"]["total"]
    assert m["plan"]["bits_per_expert_weight"] == plan["info"]["bytes"]["expert_bits"]
    assert m["git_revision"] == metrics["env"]["git_revision"]
    kept = sum(f != "prune" for f in plan["experts"][0])
    assert f"| 0 | {kept} / {len(plan['experts'][0])} |" in card.text
    if case == "nf4":               # measured: every number in the card is the one in metrics.json
        assert m["measured_on"] == "synthetic" and "synthetic checkpoint" in card.text
        assert m["metrics"]["accuracy.perplexity.mean"] == metrics["accuracy"]["perplexity"]["mean"]
        assert m["metrics"]["accuracy.kl_vs_baseline.mean"] == metrics["accuracy"]["kl_vs_baseline"]["mean"]
        assert "speed.decode_tokens_per_s" not in m["metrics"]      # the speed sweep was off: not reported
        assert m["layout"] == "mxq" and "mxq.load_model" in card.text and "vllm serve" not in card.text
    else:                           # nothing measured, nothing reported
        assert m["metrics"] is None and m["measured_on"] is None and "No quality or speed number" in card.text
        assert m["layout"] == "hf-mxfp4" and "vllm serve" in card.text
    assert card.text == build_card(out).text                         # rebuilt from the run's files alone


def test_operations_and_relation():
    plan = {"planner": "prune_then_quant", "experts": [["prune", "nvfp4"]], "attention": "bf16", "lm_head": "bf16"}
    assert operations(plan, "mxfp4") == ["pruned", "quantized"] and relation(["pruned", "quantized"]) == "quantized"
    assert operations({**plan, "experts": [["mxfp4", "mxfp4"]], "attention": "fp8"}, "mxfp4") == ["quantized"]
    assert relation(["pruned"]) is None and relation(["merged", "quantized"]) == "merge"


def test_no_export_no_card(tmp_path):
    with pytest.raises(FileNotFoundError, match="no exported model"):
        build_card(tmp_path)
