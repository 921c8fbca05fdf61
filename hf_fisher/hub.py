"""Publishing an hf_fisher artefact folder on the Hugging Face Hub, card included.

:func:`publish` uploads the folder as it is with ``huggingface_hub`` (``create_repo`` + ``upload_folder``), so the
card hf_fisher wrote stays the repo's README.md. transformers' / PEFT's ``push_to_hub`` would not do: they save the
model again into a temporary folder and write their own generic card over ours. Everything about the folder is
checked before the first network call.
"""

from __future__ import annotations

import os
from pathlib import Path

from hf_fisher.cards import HUB_TAG

# artefact file -> files it needs beside it to load
ARTEFACT_FILES: dict[str, tuple[str, ...]] = {
    "adapter_model.safetensors": ("adapter_config.json",),
    "model.safetensors": ("config.json",),
    "model.safetensors.index.json": ("config.json",),
    "unlearning_update.safetensors": (),
    "diagonal_fisher.safetensors": ("curvature_config.json",),
    "kfac.safetensors": ("curvature_config.json",),
    "rank_one_fisher.safetensors": ("curvature_config.json",),
}


def check_publishable(folder: str | os.PathLike) -> Path:
    """Raise a clear error unless ``folder`` holds an hf_fisher card and an artefact file; return it as a Path."""
    from huggingface_hub import ModelCard

    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"{str(path)!r} is not a folder; save the artefact first (e.g. save_fwsvd_adapter).")
    readme = path / "README.md"
    if not readme.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} has no README.md. hf_fisher's save functions write one; otherwise build a card with "
            "hf_fisher.cards (adapter_card, unlearning_card, fisher_card) and write it with write_card(card, folder)."
        )
    try:
        card = ModelCard.load(readme)
    except Exception as err:  # yaml errors, non-dict metadata, invalid model-index
        raise ValueError(
            f"{str(readme)!r} does not parse as a model card ({err}); rewrite it with hf_fisher.cards.write_card."
        ) from err
    tags = card.data.get("tags") or []
    if HUB_TAG not in tags:
        raise ValueError(
            f"{str(readme)!r} is not an hf_fisher card (tags {tags}, no {HUB_TAG!r}); PEFT's or transformers' "
            "save_pretrained may have replaced it. Write ours again with hf_fisher.cards.write_card(card, folder)."
        )
    present = [name for name in ARTEFACT_FILES if (path / name).is_file()]
    if not present:
        raise FileNotFoundError(
            f"{str(path)!r} holds no artefact file (one of {sorted(ARTEFACT_FILES)}); save the adapter, model, "
            "unlearning update or curvature estimate into it first."
        )
    missing = [
        f"{need} (for {name})" for name in present for need in ARTEFACT_FILES[name] if not (path / need).is_file()
    ]
    if missing:
        raise FileNotFoundError(f"{str(path)!r} is incomplete: missing {', '.join(missing)}; save the artefact again.")
    return path


def publish(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload an artefact folder (adapter, unlearning update, curvature estimate, model) to a Hub model repo.

    Checks the folder (:func:`check_publishable`) and ``repo_id`` first, then creates the repo if needed
    (``private`` only applies to a new repo), creates branch ``revision`` if given, and uploads every file with
    ``upload_folder``. Returns the commit URL.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.utils import validate_repo_id

    path = check_publishable(folder)
    try:
        validate_repo_id(repo_id)
    except ValueError as err:
        raise ValueError(f"repo_id {repo_id!r} is not a valid Hub repo id ({err}); use 'owner/name'.") from None
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision not in (None, "main"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(path),
        revision=revision,
        commit_message=commit_message or f"Upload {path.name} with hf_fisher",
    )
    return str(info.commit_url)


__all__ = ["ARTEFACT_FILES", "check_publishable", "publish"]
