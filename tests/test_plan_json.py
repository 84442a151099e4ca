"""plan.json: versioned, round-trips exactly, and a damaged or foreign file is rejected with its reason."""
from __future__ import annotations

import json

import numpy as np
import pytest

from mxq.config import GptOssConfig
from mxq.formats import get_format
from mxq.plan import Plan, PlanError
from mxq.presets import preset_config


def sample() -> Plan:
    rows = [["mxfp4", "prune", "nvfp4", "fp8"], ["prune", "bf16", "nf4_dq", "mxfp4"]]
    info = {"mixed": {"objective": 0.25, "errors": {"0.2": {"nvfp4": 0.1}}}, "arr": np.arange(3)}
    return Plan(rows, "fp8", "bf16", "mixed", {"planner": "mixed", "mixed": {"budget_bits": 4.6}},
                ["layer 0 expert 1: uncalibrated"], info)


def test_round_trip(tmp_path):
    plan = sample()
    path = plan.save(tmp_path / "run" / "plan.json")
    d = json.loads(path.read_text())
    assert d["version"] == 1 and d["num_kept"] == 3 and d["experts"][0][1] == "prune"
    back = Plan.load(path)
    assert back.experts == plan.experts and back.attention == "fp8" and back.notes == plan.notes
    assert back.info["arr"] == [0, 1, 2]
    assert Plan.from_json(back.to_json()) == back
    assert not list(tmp_path.glob("run/.*"))                # the temporary file was renamed away


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.update(version=2), "plan version 2 is not supported (this mxq reads version 1)"),
    (lambda d: d.pop("version"), "plan version None is not supported"),
    (lambda d: d.pop("experts"), "missing 'experts'"),
    (lambda d: d["experts"][1].__setitem__(0, "mxfp4"), "plan keeps different numbers of experts per layer [3, 4]"),
    (lambda d: d["experts"][0].__setitem__(2, "int3"),
     "plan.experts[0][2] = 'int3' is neither 'prune' nor a registered format"),
    (lambda d: d["experts"][1].append("mxfp4"), "plan.experts rows have different lengths [4, 5]"),
    (lambda d: d.update(num_kept=4), "num_kept=4 contradicts the experts table (3)"),
    (lambda d: d.update(lm_head="nvfp4"), "plan.lm_head = 'nvfp4': allowed formats are bf16, fp8, fp8_block"),
])
def test_invalid_plan_files_are_rejected(tmp_path, edit, message):
    d = json.loads(sample().to_json())
    edit(d)
    (tmp_path / "plan.json").write_text(json.dumps(d))
    with pytest.raises(PlanError) as e:
        Plan.load(tmp_path / "plan.json")
    assert message in str(e.value)
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.from_json("{")


def test_bytes_are_exact_per_component():
    cfg = GptOssConfig.from_hf_dict({**preset_config("tiny"), "num_hidden_layers": 2, "num_local_experts": 4,
                                     "num_experts_per_tok": 2, "layer_types": ["sliding_attention", "full_attention"]})
    plan = sample()
    b = plan.bytes(cfg)
    H, I, V = 192, 128, 6144
    ex = sum(get_format(f).nbytes(s) for f in ("mxfp4", "nvfp4", "fp8", "bf16", "nf4_dq", "mxfp4")
             for s in ((2 * I, H), (H, I)))
    assert b["experts"] == ex
    assert b["expert_biases"] == 2 * 2 * 3 * (2 * I + H) and b["router"] == 2 * 2 * 3 * (H + 1)
    q, kv = 8 * 64, 2 * 64
    att_w = sum(get_format("fp8").nbytes(s) for s in ((q, H), (kv, H), (kv, H), (H, q)))
    assert b["attention"] == 2 * (att_w + 2 * (q + 2 * kv + H + 8))
    assert b["lm_head"] == b["embed_tokens"] == 2 * V * H and b["norms"] == 2 * 5 * H
    assert b["total"] == sum(v for k, v in b.items() if k not in ("total", "expert_bits"))
    assert b["expert_bits"] == pytest.approx(8 * ex / (6 * 3 * I * H), abs=1e-6)
