"""Pushing a checked export to the Hugging Face Hub (or any server speaking its API, via HF_ENDPOINT).

The folder is checked first (intact files, then a reload that reproduces the outputs
recorded at export) and uploaded in one commit: small files inline, weights through
the Hub's large-file protocol. The token comes from HF_TOKEN or the stored login; it is
passed to huggingface_hub and never printed or written anywhere.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from .errors import UserError

RETRIES = 3


def _token() -> str:
    from huggingface_hub import get_token

    token = os.environ.get("HF_TOKEN") or get_token()
    if not token:
        raise UserError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access)")
    return token


def _explain(e: Exception, repo: str, endpoint: str) -> UserError | None:
    """A one-line message for errors retrying cannot fix (None: transient, worth retrying)."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(e, OfflineModeIsEnabled):
        return UserError("HF_HUB_OFFLINE is set, so nothing can be pushed; unset it to push")
    if isinstance(e, HfHubHTTPError) and e.response is not None:
        code = e.response.status_code
        if code == 401:
            return UserError(f"the Hub at {endpoint} rejected the token (401 Unauthorized); set HF_TOKEN to a valid token or run `hf auth login`")
        if code == 403:
            return UserError(f"the token has no write access to {repo} (403 Forbidden); use a token with write access to it")
        if code == 404:
            return UserError(f"{repo} or its branch was not found on {endpoint} (404)")
        if code < 500 and code != 429:
            return UserError(f"the Hub refused the upload to {repo} ({code}): {_first(e)}")
        return None
    if isinstance(e, (OSError, ConnectionError, TimeoutError)) or type(e).__name__ in ("ConnectError", "ReadTimeout", "RemoteProtocolError"):
        return None
    return UserError(f"upload to {repo} failed: {type(e).__name__}: {_first(e)}")


def _first(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _with_retries(what: str, fn, repo: str, endpoint: str, log):
    for attempt in range(1, RETRIES + 1):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified below
            final = _explain(e, repo, endpoint)
            if final is not None:
                raise final from None
            if attempt == RETRIES:
                raise UserError(f"could not {what} on {endpoint} after {RETRIES} attempts: {_first(e)}") from None
            log(f"{what}: {_first(e)}; retrying in {2 ** (attempt - 1)}s")
            time.sleep(2 ** (attempt - 1))


def push(folder: str | Path, repo: str, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, log=print) -> str:
    """Check ``folder`` and upload it to ``repo`` in one commit; returns the commit's URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    from . import card
    from .export import check_export_folder
    from .recipe import REPO_ID_RE

    folder = Path(folder)
    if not REPO_ID_RE.match(repo):
        raise UserError(f"{repo!r} is not a Hub repository id; write user/name")
    log(f"checking {folder} before pushing ...")
    check_export_folder(folder)
    endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    api = HfApi(endpoint=endpoint, token=_token())

    _with_retries("create the repository", lambda: api.create_repo(repo, private=private, exist_ok=True), repo, endpoint, log)
    if revision:
        _with_retries(f"create branch {revision}", lambda: api.create_branch(repo, branch=revision, exist_ok=True), repo, endpoint, log)
    readme = card.render(folder, repo).encode("utf-8")  # the card names the repository it lives in
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))

    def commit():
        ops = [CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=readme)]
        ops += [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
                for p in files if p.name != "README.md"]
        return api.create_commit(repo, operations=ops, commit_message=commit_message or f"Upload {folder.name} (llmquant)",
                                 revision=revision)

    info = _with_retries("upload", commit, repo, endpoint, log)
    return info.commit_url
