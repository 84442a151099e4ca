"""mxq's own checkpoint layout, for experts (and attention / lm_head) in any registered format, mixed.

Layout (docs/export.md): HF tensor names for everything dense (bf16); a packed weight called ``base``
is stored as the tensors ``{base}.{name}`` for each of its ``Packed.tensors`` (experts:
``model.layers.{i}.mlp.experts.{e}.gate_up`` / ``.down``; fp8 attention or lm_head: the HF weight name,
e.g. ``model.layers.{i}.self_attn.q_proj.weight``), and the shard's safetensors ``__metadata__`` maps
``base`` to JSON ``{"format", "shape", "meta"}``. ``mxq_manifest.json`` holds the layout version, the
model config (HF keys), the plan and each file's size and SHA-256.

``config.json`` is a guard, not the config: transformers 5 skips an unknown ``quantization_config`` with a
warning and loads such a folder with randomly initialised experts, and without any ``config.json`` it
builds the default (gpt-oss-20b sized) model. So ``config.json`` carries the real config except
``num_local_experts``, which is a sentence saying how to load the folder: transformers' strict config
validation (and vLLM, which uses it) then refuses at once with that sentence in the error.

Like the HF reader, every tensor is accounted for before anything is loaded: each expected dense
tensor and packed weight is present, nothing unknown is, and each packed weight has exactly its
format's ``nbytes``: a loader that skips an unknown tensor loads a
different model without saying so.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open

from ..config import ConfigError, GptOssConfig
from ..formats import FormatError, Packed, get_format
from .layout import check_tensors, hf_tensors
from .params import set_param
from .paths import confined
from .safetensors_io import DTYPE_SIZES, CheckpointError, read_header, read_json, scan_folder

MANIFEST = "mxq_manifest.json"
LAYOUT_NAME, LAYOUT_VERSION = "mxq", 1
RESERVED_META = ("format", "mxq_layout_version")
KINDS = ("gate_up", "down")


GUARD = "mxq layout (see mxq_manifest.json): load with mxq.load_model, or convert with python -m mxq.dequantize"


def hf_guard_config(cfg_d: dict) -> dict:
    """``config.json`` of an mxq-layout folder (see the module docstring)."""
    return {**cfg_d, "num_local_experts": GUARD,
            "quantization_config": {"quant_method": LAYOUT_NAME, "format_version": LAYOUT_VERSION}}


def expert_base(layer: int, e: int, kind: str) -> str:
    return f"model.layers.{layer}.mlp.experts.{e}.{kind}"


def meta_value(p: Packed) -> str:
    return json.dumps({"format": p.format, "shape": list(p.shape), "meta": p.meta}, sort_keys=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


class MxqSource:
    """Validated, lazy view of an mxq-layout folder: ``dense(name)``, ``linear(name)``, ``expert(i, kind, e)``."""

    def __init__(self, folder: str | Path):
        self.folder = folder = Path(folder)
        self.tokenizer_dir = folder
        self.manifest = m = read_json(folder / MANIFEST)
        if m.get("format") != LAYOUT_NAME or m.get("format_version") != LAYOUT_VERSION:
            raise CheckpointError(f"{folder / MANIFEST}: format {m.get('format')!r} version {m.get('format_version')!r}"
                                  f" is not supported (this mxq reads {LAYOUT_NAME!r} version {LAYOUT_VERSION})")
        if not isinstance(m.get("config"), dict):
            raise CheckpointError(f"{folder / MANIFEST}: missing the model 'config'")
        try:
            self.config = GptOssConfig.from_hf_dict(m["config"], f"{folder / MANIFEST} config")
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        self._check_files()
        self.tensors = scan_folder(folder)
        self.packed_specs: dict[str, tuple[str, tuple[int, int], dict]] = {}
        for f in sorted(folder.glob("*.safetensors")):
            for key, val in read_header(f)[1].items():
                if key not in RESERVED_META:
                    self.packed_specs[key] = self._parse_spec(f, key, val)
        self._account()
        self._cache: tuple[str, dict] | None = None

    # ------------------------------------------------------------------ validation
    def _check_files(self) -> None:
        listed = self.manifest.get("files") or {}
        if not isinstance(listed, dict):
            raise CheckpointError(f"{self.folder / MANIFEST}: 'files' must map file names to sizes and hashes")
        for name, info in listed.items():
            p = confined(self.folder, name, self.folder / MANIFEST)
            if not isinstance(info, dict):
                raise CheckpointError(f"{self.folder / MANIFEST}: entry {name!r} is not an object")
            if not p.exists():
                raise CheckpointError(f"{p}: listed in {MANIFEST} but missing")
            if p.stat().st_size != info.get("bytes"):
                raise CheckpointError(f"{p}: {p.stat().st_size} bytes, {MANIFEST} says {info.get('bytes')} "
                                      "(truncated or replaced)")
        extra = sorted(f.name for f in self.folder.glob("*.safetensors") if f.name not in listed)
        if extra:
            raise CheckpointError(f"{self.folder / extra[0]}: not listed in {MANIFEST}")

    @staticmethod
    def _parse_spec(f: Path, key: str, val: str) -> tuple[str, tuple[int, int], dict]:
        try:
            d = json.loads(val)
            fmt, shape, meta = d["format"], tuple(int(s) for s in d["shape"]), dict(d.get("meta") or {})
            get_format(fmt)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{f}: metadata {key!r} is not a valid packed-weight description ({e})") from None
        except FormatError as e:
            raise CheckpointError(f"{f}: metadata {key!r}: {e}") from None
        return fmt, shape, meta

    def _account(self) -> None:
        cfg = self.config
        expected = {n: e for n, e in hf_tensors(cfg, "mxfp4").items() if not n.endswith(("_blocks", "_scales"))}
        want_bases = {expert_base(i, e, k) for i in range(cfg.num_hidden_layers)
                      for e in range(cfg.num_local_experts) for k in KINDS}
        for base in self.packed_specs:
            if base in expected and expected[base].shape == self.packed_specs[base][1]:
                del expected[base]                           # an fp8 attention projection / lm_head
            elif base not in want_bases:
                raise CheckpointError(f"{self.folder}: metadata describes an unknown packed weight {base!r}")
        missing = sorted(want_bases - set(self.packed_specs))
        if missing:
            raise CheckpointError(f"{self.folder}: missing packed weight {missing[0]!r}"
                                  + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        dense, self.members = {}, {b: {} for b in self.packed_specs}
        for name, info in self.tensors.items():
            base, _, t = name.rpartition(".")
            if base in self.members:
                self.members[base][t] = info
            else:
                dense[name] = info
        check_tensors(dense, expected, str(self.folder))
        for base, (fmt, shape, _) in self.packed_specs.items():
            got = sum(_nbytes(i) for i in self.members[base].values())
            want = get_format(fmt).nbytes(shape)
            if got != want:
                raise CheckpointError(f"{self.folder}: packed weight {base!r} ({fmt} {list(shape)}) has {got} bytes "
                                      f"of tensors, the format needs {want}")

    # ------------------------------------------------------------------ reading
    def raw(self, name: str) -> torch.Tensor:
        """One tensor; the file is mapped only while the tensor lives (no handle kept open)."""
        info = self.tensors[name]
        try:
            with safe_open(str(info.file), framework="pt") as f:
                return f.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{info.file}: cannot read tensor {name!r}: {e}") from None

    def packed(self, base: str) -> Packed:
        fmt, shape, meta = self.packed_specs[base]
        return Packed(fmt, {t: self.raw(f"{base}.{t}") for t in sorted(self.members[base])}, shape, dict(meta))

    def linear(self, name: str) -> Packed | None:
        return self.packed(name) if name in self.packed_specs else None

    def dense(self, name: str) -> torch.Tensor:
        if name in self.packed_specs:
            p = self.packed(name)
            return get_format(p.format).dequantize(p, torch.float32)
        return self.raw(name)

    def expert(self, layer: int, kind: str, e: int) -> Packed:
        return self.packed(expert_base(layer, e, kind))

    def formats(self, layer: int) -> list[str]:
        return [self.packed_specs[expert_base(layer, e, "gate_up")][0] for e in range(self.config.num_local_experts)]


def _nbytes(info) -> int:
    n = DTYPE_SIZES[info.dtype]
    for s in info.shape:
        n *= s
    return n


def verify(folder: str | Path) -> None:
    """Check every file's SHA-256 against the manifest (a full read; loading checks sizes only)."""
    folder = Path(folder)
    m = read_json(folder / MANIFEST)
    files = m.get("files") or {}
    if not isinstance(files, dict):
        raise CheckpointError(f"{folder / MANIFEST}: 'files' must map file names to sizes and hashes")
    paths = {name: confined(folder, name, folder / MANIFEST) for name in files}    # all checked before any read
    for name, info in files.items():
        got = sha256(paths[name])
        if got != info.get("sha256"):
            raise CheckpointError(f"{folder / name}: SHA-256 {got} differs from {MANIFEST} ({info.get('sha256')})")


def load_mxq(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16):
    """Build mxq's model from an mxq-layout folder (called by ``mxq.load_model`` when the manifest exists).

    Same conventions as the HF reader: norms in float32, other dense weights in ``dtype``, experts kept
    packed in their stored formats (one ``Packed`` per expert). A packed attention projection / lm_head is
    dequantized into its ``nn.Linear`` and kept as ``_mxq_packed`` (what ``mxq.plan.apply_`` does).
    """
    from ..model import GptOssForCausalLM
    from ..model.rope import Rope

    src = MxqSource(folder)
    cfg, device = src.config, torch.device(device)
    with torch.device("meta"):
        model = GptOssForCausalLM(cfg)
    for hf, attr in (("model.embed_tokens.weight", "embed_tokens.weight"), ("lm_head.weight", "lm_head.weight"),
                     ("model.norm.weight", "norm.weight")):
        set_param(model, attr, _dense(src, model, hf, attr, device, torch.float32 if "norm" in hf else dtype))
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        for rest in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            set_param(layer, rest, src.raw(p + rest).to(device, torch.float32))
        names = [f"self_attn.{x}.{k}" for x in ("q_proj", "k_proj", "v_proj", "o_proj") for k in ("weight", "bias")]
        names += ["self_attn.sinks", "mlp.router.weight", "mlp.router.bias"]
        for rest in names:
            set_param(layer, rest, _dense(src, layer, p + rest, rest, device, dtype))
        ex = layer.mlp.experts
        set_param(ex, "gate_up_bias", src.raw(p + "mlp.experts.gate_up_proj_bias").to(device, dtype))
        set_param(ex, "down_bias", src.raw(p + "mlp.experts.down_proj_bias").to(device, dtype))
        for kind in KINDS:
            for e in range(cfg.num_local_experts):
                ex.set_expert(kind, e, src.expert(i, kind, e).to(device))
    model.rope = Rope(cfg).to(device)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise CheckpointError(f"{folder}: internal error, parameters not loaded: {leftover[:5]}")
    fmts = {f for i in range(cfg.num_hidden_layers) for f in src.formats(i)}
    model.source, model.source_format = str(Path(folder)), fmts.pop() if len(fmts) == 1 else "mixed"
    model.eval()
    return model


def _dense(src: MxqSource, owner: torch.nn.Module, hf: str, attr: str, device: torch.device,
           dtype: torch.dtype) -> torch.Tensor:
    """A dense parameter; a packed one is dequantized and its Packed kept on the owning nn.Linear."""
    p = src.linear(hf)
    if p is None:
        return src.raw(hf).to(device, dtype)
    owner.get_submodule(attr.rpartition(".")[0])._mxq_packed = p.to(device)
    return get_format(p.format).dequantize(p, torch.float32).to(device, dtype)
