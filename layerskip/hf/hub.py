"""``--checkpoint hf:OWNER/NAME[@REVISION]``: a model from the Hugging Face hub, through huggingface_hub.

Only what loading reads is downloaded (config and generation config, safetensors weights and
their index, tokenizer files), into the hub's usual cache, so a second use needs no network.
Every failure (offline and not cached, unknown or gated repository, no network) is one
CheckpointError line saying what to do.
"""

from __future__ import annotations

import re
from pathlib import Path

from layerskip.errors import CheckpointError, ConfigError

FILES = ["config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
         "model-*.safetensors", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
         "special_tokens_map.json"]
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def download(repo: str) -> Path:
    """The local directory of hub repository ``OWNER/NAME[@REVISION]``, downloaded unless cached."""
    repo_id, _, revision = repo.partition("@")
    if not REPO_ID.fullmatch(repo_id):
        raise CheckpointError(f"hf:{repo} is not a Hugging Face repository id; write hf:OWNER/NAME "
                              "(for example hf:facebook/layerskip-llama3.2-1B)")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        raise ConfigError(f'hf:{repo} needs huggingface_hub: pip install -e ".[hub]"') from None
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=FILES))
    except GatedRepoError:
        raise CheckpointError(f"hf:{repo} is gated: accept its licence on https://huggingface.co/{repo_id}, then "
                              "log in (hf auth login) or set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"hf:{repo}: no such repository on the Hugging Face hub (or it is private: log in "
                              "with hf auth login or set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"hf:{repo}: the repository has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        raise CheckpointError(f"hf:{repo} is not in the local Hugging Face cache and the hub cannot be reached "
                              "(offline, or HF_HUB_OFFLINE=1); download it once with network access, or pass a "
                              "local model directory") from None
    except Exception as exc:  # network and server errors come in many types; all mean "not downloaded"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"hf:{repo} could not be downloaded ({type(exc).__name__}: {reason})") from None
