"""Upload a finished run's model to the Hugging Face Hub.

Uploads OUTPUT_DIR/final (safetensors, config, tokenizer with chat template, generation config and
the model card README.md written at the end of training) with create_repo + upload_folder, retrying
on failure. The token comes from HF_TOKEN or `huggingface-cli login`; it is never printed or saved.

  python tools/push_to_hub.py outputs/quickstart --repo-id me/tiny-starchat
  python tools/push_to_hub.py data/starchat-alpha              # repo id and privacy from its config.yaml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from loop.report import hub


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output_dir", type=Path, help="a run's output directory (holds final/ and config.yaml)")
    p.add_argument("--repo-id", help="default: output.hub_model_id of the run's config")
    p.add_argument("--public", action="store_true", help="create the repo public (default: the run's setting)")
    p.add_argument("--revision", help="upload to this branch instead of main")
    a = p.parse_args(argv)
    folder = a.output_dir / "final"
    if not (folder / "config.json").is_file():
        print(f"error: {folder} holds no finished model (no config.json)", file=sys.stderr)
        return 2
    saved = a.output_dir / "config.yaml"
    run_cfg = yaml.safe_load(saved.read_text()) if saved.is_file() else {}
    out_cfg = run_cfg.get("output", {})
    repo = a.repo_id or out_cfg.get("hub_model_id")
    if not repo:
        print("error: no --repo-id and no output.hub_model_id in the run's config.yaml", file=sys.stderr)
        return 2
    private = not a.public and out_cfg.get("hub_private", True)
    try:
        url = hub.upload(folder, repo, private, revision=a.revision, message="Upload model with tools/push_to_hub.py")
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"uploaded {folder} to {repo}: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
