"""``mxq publish RUN_DIR --repo-id NAME [--push]``: check a run's export and upload it to the Hugging Face Hub.

Dry run by default: prints the files that would be uploaded with their sizes, the checks they passed and the
start of the model card; nothing leaves the machine. ``--push`` uploads ``RUN_DIR/model`` with
``huggingface_hub.HfApi.upload_folder`` (after ``create_repo(exist_ok=True)``), with the token from ``--token``,
``HF_TOKEN`` or the Hub's login. A folder is refused before anything is uploaded when any check fails:

* the run completed (``mxq.rundir.is_complete``: no ``.incomplete`` marker, ``run_meta.json`` written),
* ``model/README.md`` exists and ``huggingface_hub.ModelCard`` parses its metadata (``base_model``,
  ``library_name: mxq``),
* the run reloaded the export from disk before measuring it (``metrics.json``: ``evaluated.reloaded_from_disk``),
* every shard is intact: the mxq layout's SHA-256s match its manifest (``mxq.io.mxq_layout.verify``); an HF
  layout's index names only shards that exist, and each shard's header lists exactly the index's tensors.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


class PublishError(ValueError):
    """A run folder that must not be uploaded; the message names the failed check."""


def _check_shards(model_dir: Path) -> str:
    if (model_dir / "mxq_manifest.json").is_file():
        from ..io.mxq_layout import verify

        try:
            verify(model_dir)
        except Exception as e:   # any failure of the hash check refuses the folder, named
            raise PublishError(f"{model_dir}: shard check failed: {e}") from e
        return "every shard's SHA-256 matches mxq_manifest.json"
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        wm = json.loads(index.read_text())["weight_map"]
    elif (model_dir / "model.safetensors").is_file():
        with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
            wm = dict.fromkeys(f.keys(), "model.safetensors")
    else:
        raise PublishError(f"{model_dir}: no model.safetensors and no model.safetensors.index.json")
    by_file: dict[str, set[str]] = {}
    for name, file in wm.items():
        by_file.setdefault(file, set()).add(name)
    for file, names in sorted(by_file.items()):
        p = model_dir / file
        if not p.is_file():
            raise PublishError(f"{p}: listed in the index but missing")
        with safe_open(str(p), "pt") as f:
            if set(f.keys()) != names:
                raise PublishError(f"{p}: its tensors differ from the index's ({len(set(f.keys()) ^ names)} names)")
    return f"{len(by_file)} shard(s) hold exactly the index's {len(wm)} tensors"


def check(run_dir: str | Path) -> list[str]:
    """Every check of the module docstring, in order; returns what passed or raises ``PublishError``."""
    from huggingface_hub import ModelCard

    from ..rundir import is_complete

    run_dir = Path(run_dir)
    model_dir = run_dir / "model"
    if not model_dir.is_dir():
        raise PublishError(f"{model_dir}: no exported model in this run (recipe.export.enabled=false?)")
    if not is_complete(run_dir):
        raise PublishError(f"{run_dir}: the run did not complete (.incomplete marker or no run_meta.json)")
    passed = ["the run completed"]
    card = model_dir / "README.md"
    if not card.is_file():
        raise PublishError(f"{card}: missing model card (write it with python -m mxq.publish.card {run_dir})")
    meta = ModelCard.load(card).data.to_dict()
    if not meta.get("base_model") or meta.get("library_name") != "mxq":
        raise PublishError(f"{card}: its metadata lacks base_model or library_name: mxq")
    passed.append(f"model card parsed (base_model {meta['base_model']})")
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    if not (metrics.get("evaluated") or {}).get("reloaded_from_disk"):
        raise PublishError(f"{run_dir / 'metrics.json'}: the run did not reload the export from disk")
    passed.append("the run reloaded the export from disk with mxq.load_model")
    passed.append(_check_shards(model_dir))
    return passed


def plan_upload(run_dir: str | Path) -> list[tuple[str, int]]:
    """(path inside the repository, bytes) of every file of ``run_dir/model``, sorted."""
    model_dir = Path(run_dir) / "model"
    return sorted((p.relative_to(model_dir).as_posix(), p.stat().st_size) for p in model_dir.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="mxq publish", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--repo-id", required=True, help="the Hub repository, e.g. me/gpt-oss-20b-reap25")
    ap.add_argument("--push", action="store_true", help="upload (default: dry run, nothing leaves the machine)")
    ap.add_argument("--private", action="store_true", help="create the repository private")
    ap.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the Hub login)")
    a = ap.parse_args(argv)
    try:
        passed = check(a.run_dir)
    except PublishError as e:
        raise SystemExit(f"mxq publish: refused: {e}") from None
    files = plan_upload(a.run_dir)
    print(f"repository: {a.repo_id}\nchecks passed:")
    print("\n".join(f"  - {c}" for c in passed))
    print(f"files ({len(files)}, {sum(s for _, s in files):,} bytes):")
    print("\n".join(f"  {s:>15,}  {n}" for n, s in files))
    card = (a.run_dir / "model" / "README.md").read_text().splitlines()
    print("model card (first 30 lines):\n" + "\n".join("  | " + line for line in card[:30]))
    result = {"repo_id": a.repo_id, "checks": passed, "files": files, "pushed": False}
    if not a.push:
        print("dry run: nothing uploaded (add --push to upload)")
        return result
    from huggingface_hub import HfApi

    api = HfApi(token=a.token)
    api.create_repo(a.repo_id, private=a.private, exist_ok=True, repo_type="model")
    info = api.upload_folder(folder_path=str(a.run_dir / "model"), repo_id=a.repo_id, repo_type="model",
                             commit_message=f"mxq export ({len(files)} files)")
    print(f"uploaded: {info}")
    result["pushed"] = True
    return result


if __name__ == "__main__":
    main()
