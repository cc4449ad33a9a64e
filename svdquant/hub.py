"""Publishing a checkpoint folder to the Hugging Face Hub (``svdquant quantize ... --push-to-hub REPO``).

Everything that can be known before a long quantization is checked first (:func:`check_push_target`):
the repo id's form, that the Hub may be reached (``HF_HUB_OFFLINE``) and that a token is at hand. The
upload itself is huggingface_hub's ``create_repo`` + ``upload_folder`` (one commit), after the folder's
checkpoint and model card are complete on disk, so a failed upload leaves a good local checkpoint and a
one-line error that says how to retry (``hf upload``).
"""

from __future__ import annotations

import os
from pathlib import Path


def check_push_target(repo_id: str, *, name: str = "repo_id") -> str:
    """``repo_id`` if it can be pushed to now, else ValueError naming the fix (no network call)."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(repo_id, str) or not repo_id.strip():
        raise ValueError(f"{name} must be a Hub repo id such as 'your-name/flux-int4'")
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ValueError(f"{name} {repo_id!r} is not a Hub repo id; use 'owner/name' with letters, digits, "
                         "'-', '_' and '.' (e.g. 'your-name/flux-int4')") from None
    if constants.HF_HUB_OFFLINE:
        raise ValueError(f"{name} {repo_id}: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it, or "
                         f"save locally and upload later with `hf upload {repo_id} FOLDER`")
    if get_token() is None:
        raise ValueError(f"{name} {repo_id}: no Hugging Face token; run `hf auth login` or set HF_TOKEN first")
    return repo_id


def push_to_hub(folder: str | os.PathLike, repo_id: str, *, private: bool = False,
                commit_message: str = "svdquant checkpoint") -> str:
    """Upload a checkpoint folder written by :func:`svdquant.save_quantized` (with its model card) to
    ``repo_id`` (created if needed). Returns the repo's URL."""
    from huggingface_hub import HfApi

    from .checkpoint import read_metadata

    check_push_target(repo_id)
    folder = Path(folder)
    read_metadata(folder)  # a CheckpointError if the folder is not a complete checkpoint
    if not (folder / "README.md").is_file():
        raise ValueError(f"{folder} has no model card (README.md); save it with save_quantized(..., "
                         "model_card=True) before pushing")
    api = HfApi()
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message=commit_message)
    except Exception as e:  # network, permissions, quota: the local checkpoint is complete either way
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConnectionError(f"uploading {folder} to {repo_id} failed ({first}); the checkpoint is saved: "
                           f"retry with `hf upload {repo_id} {folder}`") from None
    return str(url)
