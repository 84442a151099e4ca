"""GGUF export (mxq.io.targets.gguf): bit-exact MXFP4, tensor set and metadata llama.cpp's gpt-oss reads,
refusals, tokenizer metadata, and (where llama-cpp-python is installed) llama.cpp's perplexity and
tokenization against mxq's on held-out text."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

import mxq  # noqa: E402
from mxq.convert import convert, source_plan  # noqa: E402
from mxq.formats import get_format  # noqa: E402
from mxq.formats.mxfp4 import dequantize_mxfp4  # noqa: E402
from mxq.io.errors import ExportError  # noqa: E402
from mxq.io.sources import open_source  # noqa: E402
from mxq.io.targets import export_checkpoint, write_target  # noqa: E402
from mxq.io.targets.gguf import _write_metadata, mxfp4_to_ggml, tokenizer_metadata  # noqa: E402
from mxq.plan import PRUNE, Plan  # noqa: E402
from mxq.presets import resolve_preset_path  # noqa: E402

TINY = resolve_preset_path("tiny")


def _pruned_plan(cfg) -> Plan:
    """A quarter of the experts of every layer dropped (a different set per layer), the rest kept as stored."""
    E, k = cfg.num_local_experts, cfg.num_local_experts // 4
    return Plan([[PRUNE if (e + 3 * i) % E < k else "mxfp4" for e in range(E)] for i in range(cfg.num_hidden_layers)])


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    """GGUFs of the embedded model: as shipped, and pruned by a quarter (through an HF pruned checkpoint)."""
    d = tmp_path_factory.mktemp("gguf")
    cfg = open_source(TINY).config
    pruned_hf = export_checkpoint(TINY, _pruned_plan(cfg), d / "pruned_hf")
    return {"base": (TINY, convert(TINY, "gguf", d / "base.gguf").path),
            "pruned": (pruned_hf, convert(pruned_hf, "gguf", d / "pruned.gguf").path)}


def _tensors(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def _field(reader, key):
    f = reader.fields[key]
    v = f.parts[f.data[0]]
    return bytes(v).decode() if f.types[0] == gguf.GGUFValueType.STRING else v.tolist()[0]


def test_mxfp4_repack_is_bit_exact_against_gguf_reference_for_every_scale_byte():
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (255, 3, 16), generator=g, dtype=torch.uint8)      # [rows, n/32, 16]
    scales = torch.arange(255, dtype=torch.uint8)[:, None].expand(255, 3).contiguous()  # every E8M0 byte
    ref = gguf.quants.dequantize(mxfp4_to_ggml(blocks, scales), gguf.GGMLQuantizationType.MXFP4)
    ours = dequantize_mxfp4(blocks, scales, torch.float32).numpy()                     # [255, 96]
    with np.errstate(over="ignore"):
        assert np.array_equal(ref.reshape(ours.shape), ours)


@pytest.mark.parametrize("which", ["base", "pruned"])
def test_gguf_holds_every_tensor_llama_cpp_reads_with_experts_bit_exact(ggufs, which):
    src_dir, path = ggufs[which]
    src = open_source(src_dir)
    cfg, K = src.config, src.config.num_local_experts
    ts = _tensors(path)
    per_layer = {"attn_norm.weight", "post_attention_norm.weight", "attn_sinks.weight", "ffn_gate_inp.weight",
                 "ffn_gate_inp.bias"} | {f"attn_{x}.{k}" for x in ("q", "k", "v", "output") for k in ("weight", "bias")} \
        | {f"ffn_{x}_exps.{k}" for x in ("gate", "up", "down") for k in ("weight", "bias")}
    want = {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{n}" for i in range(cfg.num_hidden_layers) for n in per_layer}
    assert set(ts) == want
    for i in range(cfg.num_hidden_layers):
        gu = [src.expert(i, "gate_up", e) for e in range(K)]
        dn = [src.expert(i, "down", e) for e in range(K)]
        w_gu = torch.stack([get_format("mxfp4").dequantize(p, torch.float32) for p in gu])    # [K, 2I, H]
        w_dn = torch.stack([get_format("mxfp4").dequantize(p, torch.float32) for p in dn])    # [K, H, I]
        for part, w in (("gate", w_gu[:, 0::2]), ("up", w_gu[:, 1::2]), ("down", w_dn)):
            t = ts[f"blk.{i}.ffn_{part}_exps.weight"]
            assert t.tensor_type == gguf.GGMLQuantizationType.MXFP4
            assert np.array_equal(gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape), w.numpy())
        bias = src.dense(f"model.layers.{i}.mlp.experts.gate_up_proj_bias").float()           # [K, 2I]
        assert np.array_equal(ts[f"blk.{i}.ffn_up_exps.bias"].data, bias[:, 1::2].numpy())
        router = src.dense(f"model.layers.{i}.mlp.router.weight").float()                     # [K, H]
        assert np.array_equal(ts[f"blk.{i}.ffn_gate_inp.weight"].data, router.numpy())
    r = gguf.GGUFReader(str(path))
    assert _field(r, "general.architecture") == "gpt-oss"
    assert _field(r, "gpt-oss.expert_count") == K
    assert _field(r, "tokenizer.ggml.pre") == "gpt-4o"
    assert len(r.fields["tokenizer.ggml.tokens"].data) == cfg.vocab_size


def test_refusals_name_the_layer_and_the_options(tmp_path):
    src = open_source(TINY)
    cfg = src.config
    E = cfg.num_local_experts
    mixed = Plan([["nvfp4" if (i == 2 and e % 2) else "mxfp4" for e in range(E)] for i in range(cfg.num_hidden_layers)])
    with pytest.raises(ExportError, match=r"layer 2 holds experts in mxfp4, nvfp4.*--gguf-type"):
        write_target("gguf", src, mixed, tmp_path / "m.gguf")
    nv = Plan.uniform(cfg.num_hidden_layers, E, "nvfp4")
    with pytest.raises(ExportError, match=r"layer 0 experts are nvfp4, which has no exact GGML type"):
        write_target("gguf", src, nv, tmp_path / "n.gguf")
    assert not list(tmp_path.iterdir())                                      # nothing written, not even a temp


def test_requantization_only_when_asked_and_the_error_is_measured(tmp_path):
    src = open_source(TINY)
    cfg = src.config
    E = cfg.num_local_experts
    plan = Plan([["nvfp4" if (i == 1 and e % 2) else "mxfp4" for e in range(E)] for i in range(cfg.num_hidden_layers)])
    w = write_target("gguf", src, plan, tmp_path / "q.gguf", gguf_type="q8_0")
    assert len(w.notes) == 1 and "re-quantized to q8_0" in w.notes[0]
    ts = _tensors(w.path)
    assert ts["blk.1.ffn_gate_exps.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert ts["blk.0.ffn_gate_exps.weight"].tensor_type == gguf.GGMLQuantizationType.MXFP4   # exact layers stay
    from mxq.formats.convert import convert as conv

    ps = [conv(src.expert(1, "down", e), f) for e, f in enumerate(plan.experts[1])]
    ref = torch.stack([get_format(p.format).dequantize(p, torch.float32) for p in ps]).numpy()  # [E, H, I]
    t = ts["blk.1.ffn_down_exps.weight"]
    got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ref.shape)
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert 0 < rel < 0.01                                   # q8_0 of the dequantized weights: small, not zero
    assert f"{rel:.4g}" in w.notes[0] or "max" in w.notes[0]


def test_converter_refuses_existing_out_and_writes_atomically(tmp_path, monkeypatch):
    out = tmp_path / "x.gguf"
    out.write_bytes(b"keep")
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert(TINY, "gguf", out)
    import mxq.io.targets.gguf as g

    def boom(*a, **k):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(g, "mxfp4_to_ggml", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        convert(TINY, "gguf", out, overwrite=True)
    assert out.read_bytes() == b"keep" and sorted(p.name for p in tmp_path.iterdir()) == ["x.gguf"]


def test_a_tokenizer_llama_cpp_cannot_match_is_refused(tmp_path):
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY / f, tmp_path / f)
    tj = json.loads((tmp_path / "tokenizer.json").read_text())
    tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+|\w+"
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ExportError, match="not tiktoken's o200k split"):
        tokenizer_metadata(tmp_path, open_source(TINY).config)


def test_o200k_tokenizer_metadata_is_complete():
    from mxq.tokenizer import HARMONY_SPECIALS, _preset_dir

    cfg = mxq.GptOssConfig(vocab_size=201088, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_local_experts=4,
                           num_experts_per_tok=2, eos_token_id=200002, pad_token_id=199999, bos_token_id=199998)
    tok = tokenizer_metadata(_preset_dir("o200k_harmony"), cfg)
    assert tok["pre"] == "gpt-4o" and len(tok["tokens"]) == 201088
    T = gguf.TokenType
    for s, i in HARMONY_SPECIALS.items():
        assert tok["tokens"][i] == s and tok["types"][i] == T.CONTROL
    assert tok["tokens"][200001] == "<|reserved_200001|>" and tok["types"][200001] == T.CONTROL
    assert tok["types"][200019] == T.UNUSED and tok["tokens"][200019] == "[PAD200019]"     # beyond the tokenizer
    assert len(tok["merges"]) > 100_000 and tok["chat_template"]


# ------------------------------------------------------------------------------ llama.cpp itself
llama_cpp = None
try:
    import llama_cpp  # noqa: F811
except ImportError:
    pass
needs_llama = pytest.mark.skipif(llama_cpp is None, reason="llama-cpp-python is not installed")


def _heldout(tokenizer, n_chars: int = 6000) -> tuple[str, list[int]]:
    from mxq.data.corpus import load_text

    text = load_text("austen", "heldout")[:n_chars]
    return text, tokenizer(text, add_special_tokens=False).input_ids


@needs_llama
@pytest.mark.parametrize("which", ["base", "pruned"])
def test_llama_cpp_scores_heldout_text_like_mxq(ggufs, which):
    from bench.gguf_llama_cpp import llama_nll
    from mxq.evaluate.perplexity import sliding_windows, target_logprobs

    src_dir, path = ggufs[which]
    tokenizer = mxq.load_tokenizer(src_dir)
    text, ids = _heldout(tokenizer)
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids     # token for token
    max_len = 512
    windows = sliding_windows(len(ids), max_len, max_len)
    nll, n = llama_nll(path, ids, windows, 1024, n_threads=2)
    model = mxq.load_model(src_dir, dtype=torch.float32)
    lp = target_logprobs(model, torch.tensor(ids), max_len, max_len, batch_size=4)
    ppl_mxq, ppl_llama = math.exp(-float(lp.double().sum()) / lp.numel()), math.exp(nll / n)
    assert n == lp.numel()
    assert abs(ppl_llama / ppl_mxq - 1) < 0.01, (ppl_mxq, ppl_llama)


@needs_llama
def test_llama_cpp_tokenizes_o200k_like_mxq(tmp_path):
    from mxq.tokenizer import _preset_dir

    cfg = mxq.GptOssConfig(vocab_size=201088, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_local_experts=4,
                           num_experts_per_tok=2, eos_token_id=200002, pad_token_id=199999, bos_token_id=199998)
    d = _preset_dir("o200k_harmony")
    w = gguf.GGUFWriter(str(tmp_path / "vocab.gguf"), "gpt-oss")
    _write_metadata(w, cfg, Plan.uniform(2, 4, "mxfp4"), tokenizer_metadata(d, cfg), "o200k", None, None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    llm = llama_cpp.Llama(model_path=str(tmp_path / "vocab.gguf"), vocab_only=True, verbose=False)
    tok = mxq.load_tokenizer("gpt-oss-20b")
    from mxq.data.corpus import load_text

    for text in (load_text("austen", "heldout")[:4000], load_text("shakespeare", "heldout")[:4000],
                 "naïve café — 3.14159, 12345 apples; ДОБРЫЙ день! 日本語のテキスト\n\n\tx  y"):
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok(text, add_special_tokens=False).input_ids
    prompt = mxq.tokenizer.harmony_prompt("Hi there")
    assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == tok(prompt, add_special_tokens=False).input_ids


def test_int4_g32_experts_map_exactly_onto_q4_0(tmp_path):
    src = open_source(TINY)
    cfg = src.config
    plan = Plan.uniform(cfg.num_hidden_layers, cfg.num_local_experts, "int4_g32")
    int4 = open_source(export_checkpoint(TINY, plan, tmp_path / "int4"))
    w = write_target("gguf", int4, source_plan(int4), tmp_path / "i.gguf")
    assert w.notes == []                                                   # nothing re-quantized
    t = _tensors(w.path)["blk.3.ffn_up_exps.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0
    ref = torch.stack([get_format("int4_g32").dequantize(int4.expert(3, "gate_up", e), torch.float32)[1::2]
                       for e in range(cfg.num_local_experts)]).numpy()
    assert np.array_equal(gguf.quants.dequantize(t.data, t.tensor_type).reshape(ref.shape), ref)


def test_bf16_experts_are_written_as_bf16_unchanged(tmp_path):
    cfg = open_source(TINY).config
    bf = open_source(export_checkpoint(TINY, Plan.uniform(cfg.num_hidden_layers, cfg.num_local_experts, "bf16"),
                                       tmp_path / "bf16"))
    w = write_target("gguf", bf, source_plan(bf), tmp_path / "b.gguf")
    r = gguf.GGUFReader(str(w.path))
    assert _field(r, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_BF16)
    t = {t.name: t for t in r.tensors}["blk.0.ffn_down_exps.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType.BF16
    ref = torch.stack([bf.expert(0, "down", e).tensors["weight"] for e in range(cfg.num_local_experts)])  # [E, H, I]
    assert np.array_equal(np.asarray(t.data).view(np.uint16).reshape(ref.shape), ref.view(torch.int16).numpy().view(np.uint16))
