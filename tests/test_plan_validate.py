"""Invalid recipes and plans are rejected before any work, with a message naming the option."""
from __future__ import annotations

import pytest
import torch

import mxq
from mxq.config import GptOssConfig
from mxq.plan import Plan, PlanError, apply_, build_plan, validate
from mxq.presets import preset_config


@pytest.fixture(scope="module")
def tiny():
    return GptOssConfig.from_hf_dict(preset_config("tiny"))        # 4 layers x 32 experts, top-4, H 192, I 128


@pytest.fixture(scope="module")
def odd():
    """tiny with I = 120: not a multiple of MXFP4's 32-element blocks."""
    return GptOssConfig.from_hf_dict({**preset_config("tiny"), "intermediate_size": 120})


CASES = [
    ({"planner": "shrink"},
     "recipe.planner='shrink': unknown planner; choose from merge, mixed, prune, prune_then_quant, uniform"),
    ({"planner": "prune", "stats": True, "prune": {"fraction": 1.0}},
     "recipe.prune.fraction=1.0: must be a number in [0, 1)"),
    ({"planner": "prune", "stats": True, "prune": {"fraction": -0.1}}, "recipe.prune.fraction=-0.1: must be a number"),
    ({"planner": "prune", "stats": True, "prune": {"fraction": 0.95}},
     "recipe.prune.fraction=0.95: keeps 2 of 32 experts per layer, fewer than num_experts_per_tok=4 "
     "(top-k must not exceed the experts kept)"),
    ({"planner": "prune", "stats": True, "prune": {"criterion": "magnitude"}},
     "recipe.prune.criterion='magnitude': unknown criterion"),
    ({"planner": "prune", "prune": {"criterion": "reap"}},
     "recipe.prune.criterion='reap': needs router statistics; set recipe.stats=true"),
    ({"planner": "prune", "stats": True, "prune": {"protect_super": "yes"}},
     "recipe.prune.protect_super='yes': must be true or false"),
    ({"planner": "prune", "stats": True, "quant": {"format": "nvfp4"}},
     "recipe.quant.format='nvfp4': planner=prune keeps the source format"),
    ({"planner": "uniform", "quant": {"format": "nvfp4"}, "prune": {"fraction": 0.25}},
     "recipe.prune.fraction=0.25: planner=uniform does not prune"),
    ({"planner": "uniform", "quant": {"format": "nvfp4"}, "mixed": {"budget_bits": 4.5}},
     "recipe.mixed.budget_bits=4.5: is not used: planner=uniform with quant.format=nvfp4"),
    ({"planner": "mixed", "quant": {"format": "nvfp4"}, "mixed": {"budget_bits": 4.5, "importance": "uniform"}},
     "recipe.quant.format='nvfp4': planner=mixed chooses the expert formats itself"),
    ({"planner": "uniform", "quant": {"format": "int5"}}, "recipe.quant.format='int5': not a registered format"),
    ({"planner": "uniform", "quant": {"format": "mixed"}},
     "recipe.quant.format='mixed': not a registered format; choose from keep"),
    ({"planner": "uniform", "quant": {"format": "mxfp4", "attention": "nvfp4"}},
     "recipe.quant.attention='nvfp4': allowed formats are bf16, fp8, fp8_block"),
    ({"planner": "uniform", "quant": {"format": "mxfp4", "lm_head": "int4_g32"}}, "recipe.quant.lm_head='int4_g32'"),
    ({"planner": "mixed", "mixed": {"budget_bits": 4.5, "importance": "uniform", "menu": ["nvfp4", "int3"]}},
     "recipe.mixed.menu='int3': not a registered format"),
    ({"planner": "mixed", "mixed": {"budget_bits": 4.5, "importance": "uniform", "menu": []}},
     "recipe.mixed.menu=[]: must be a non-empty list"),
    ({"planner": "mixed", "mixed": {"budget_bits": 3.0, "importance": "uniform"}},
     "recipe.mixed.budget_bits=3.0: is below the cheapest menu choice (nf4_dq: 4.1"),
    ({"planner": "mixed", "mixed": {"budget_bytes": 1000, "importance": "uniform"}},
     "recipe.mixed.budget_bytes=1000: is below the cheapest menu choice (nf4_dq:"),
    ({"planner": "mixed", "mixed": {"importance": "uniform"}},
     "set exactly one of recipe.mixed.budget_bits and recipe.mixed.budget_bytes"),
    ({"planner": "mixed", "mixed": {"budget_bits": 4.5, "budget_bytes": 10**9, "importance": "uniform"}},
     "set exactly one of"),
    ({"planner": "mixed", "mixed": {"budget_bits": 4.5}}, "recipe.mixed.importance='reap': needs router statistics"),
    ({"planner": "mixed", "mixed": {"budget_bits": 4.5, "importance": "uniform", "solver": "cplex"}},
     "recipe.mixed.solver='cplex': unknown solver"),
    ({"planner": "mixed", "mixed": {"budget_bits": 4.5, "importance": "uniform", "scope": "expert"}},
     "recipe.mixed.scope='expert': unknown scope"),
    ({"planner": "uniform", "quant": {"format": "mxfp4"}, "export": {"enabled": "yes"}},
     "recipe.export.enabled='yes': must be true or false"),
]


@pytest.mark.parametrize("recipe,message", CASES)
def test_invalid_recipe_names_the_option(tiny, recipe, message):
    with pytest.raises(PlanError) as e:
        validate(recipe, tiny)
    assert message in str(e.value)


def test_shape_errors_use_the_real_model_dimensions(odd):
    with pytest.raises(PlanError, match=r"recipe.quant.format='mxfp4': cannot hold this model's expert down "
                                        r"weights \[192, 120\]"):
        validate({"planner": "uniform", "quant": {"format": "mxfp4"}}, odd)
    with pytest.raises(PlanError, match=r"recipe.mixed.menu='mxfp4': cannot hold"):
        validate({"planner": "mixed", "mixed": {"menu": ["fp8", "mxfp4"], "budget_bits": 9,
                                                "importance": "uniform"}}, odd)
    validate({"planner": "uniform", "quant": {"format": "fp8"}}, odd)


def test_valid_recipes_pass_and_come_back_normalised(tiny):
    r = validate({"planner": "prune_then_quant", "stats": True, "prune": {"fraction": 0.5},
                  "quant": {"format": "mixed"}, "mixed": {"budget_bits": 4.5}}, tiny)
    assert r["prune"]["criterion"] == "reap" and r["mixed"]["solver"] == "milp"
    assert validate({"planner": None}, tiny)["planner"] is None
    from omegaconf import OmegaConf

    dc = OmegaConf.create({"planner": "uniform", "quant": {"format": "fp8"}})
    assert validate(dc, tiny)["quant"]["format"] == "fp8"


class Untouchable:
    """Statistics that fail the test if a planner reads them."""
    num_layers, num_experts = 2, 32

    def __getattr__(self, name):
        raise AssertionError(f"statistics read ({name}) before validation")

    def score(self, name):
        raise AssertionError("statistics read before validation")


def test_build_plan_validates_before_reading_statistics_or_weights(make_ckpt):
    model = mxq.load_model(make_ckpt("mxfp4"))                      # 32 experts, top-4
    with pytest.raises(PlanError, match="recipe.prune.fraction=0.95"):
        build_plan({"planner": "prune", "stats": True, "prune": {"fraction": 0.95}}, Untouchable(), model)
    assert model.config.num_local_experts == 32


def test_invalid_plans_are_rejected_before_the_model_changes(make_ckpt):
    model = mxq.load_model(make_ckpt("mxfp4"), dtype=torch.float32)
    before = model.layers[0].mlp.experts.packed("gate_up", 0).tensors["blocks"].clone()
    bad = {
        "plan keeps different numbers of experts per layer [31, 32]":
            Plan([["mxfp4"] * 32, ["mxfp4"] * 31 + ["prune"]]),
        "fewer than num_experts_per_tok": Plan([["mxfp4"] * 3 + ["prune"] * 29] * 2),
        "neither 'prune' nor a registered format": Plan([["mxfp4"] * 31 + ["int3"]] * 2),
        "plan is for 1 layers": Plan([["mxfp4"] * 32]),
        "plan.lm_head = 'mxfp4'": Plan([["mxfp4"] * 32] * 2, lm_head="mxfp4"),
        "plan.attention = 'nf4'": Plan([["mxfp4"] * 32] * 2, attention="nf4"),
    }
    for msg, plan in bad.items():
        with pytest.raises(PlanError) as e:
            apply_(model, plan)
        assert msg in str(e.value), (msg, str(e.value))
    assert model.config.num_local_experts == 32 and len(model.layers[1].mlp.experts.formats()) == 32
    assert torch.equal(model.layers[0].mlp.experts.packed("gate_up", 0).tensors["blocks"], before)
