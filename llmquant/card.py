"""The model card (README.md) of an export: Hub front matter, how it was made, real numbers, how to load it."""

from __future__ import annotations

import json
from pathlib import Path

from . import assets
from .errors import UserError
from .report import grouped_rows, human_bytes


def base_model_info(source: str) -> tuple[str | None, str | None]:
    """(Hub id, license) of the model an export was made from, when they can be known offline."""
    if source.startswith(assets.ASSET_PREFIX):
        a = assets.get(source[len(assets.ASSET_PREFIX) :])
        return a.base_model, a.license
    p = Path(source).expanduser()
    if p.exists():
        readme = (p if p.is_dir() else p.parent) / "README.md"
        if readme.is_file():
            from huggingface_hub import ModelCard

            data = ModelCard.load(readme).data
            return getattr(data, "base_model", None), getattr(data, "license", None)
        return None, None
    return source.split("@")[0], None  # a Hub id


def tags_for(formats: set[str]) -> list[str]:
    tags = ["llmquant", "bitsandbytes", "quantized"]
    if formats & {"nf4", "fp4"}:
        tags.append("4-bit")
    if "int8" in formats:
        tags.append("8-bit")
    if len(formats & {"nf4", "fp4", "int8"}) > 1 or any(f not in ("nf4", "fp4", "int8") for f in formats):
        tags.append("mixed-precision")
    return tags + sorted(formats & {"nf4", "fp4", "int8"})


def render(folder: str | Path, model_id: str | None = None) -> str:
    """The card of an llmquant export folder (reads llmquant.json, recipe.yaml, results.json)."""
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    meta_path = folder / "llmquant.json"
    if not meta_path.is_file():
        raise UserError(f"{folder} is not an llmquant export (no llmquant.json)")
    meta = json.loads(meta_path.read_text())
    recipe = (folder / "recipe.yaml").read_text() if (folder / "recipe.yaml").is_file() else ""
    results = json.loads((folder / "results.json").read_text()) if (folder / "results.json").is_file() else None
    import yaml

    source = (yaml.safe_load(recipe) or {}).get("model", {}).get("source") if recipe else None
    base, license_ = base_model_info(source or meta["base_model"])
    formats = {l["format"].split("/")[0].split("(")[0] for l in meta["layers"] if l["format"] != "unchanged"}
    data = ModelCardData(
        base_model=base, library_name="transformers", pipeline_tag="text-generation", license=license_,
        tags=tags_for(formats), base_model_relation="quantized" if base else None,
    )
    model_id = model_id or folder.name
    stock = meta["checkpoint_format"] != "llmquant"
    s = meta["sizes"]
    n_params = s["quantized_bytes"] * 8 / s["model_bits_per_weight"]
    lines = [
        f"# {model_id}",
        "",
        f"{base or meta['base_model']} quantized with llmquant {meta['llmquant_version']} into bitsandbytes formats "
        f"({', '.join(sorted(formats))}). " + (
            "The checkpoint uses the stock bitsandbytes `quantization_config`: plain transformers loads it."
            if stock else "The checkpoint mixes formats per layer: load it with transformers after `import llmquant`."
        ),
        "",
        "## Use it",
        "",
        "```python",
        *([] if stock else ["import llmquant  # registers the llmquant checkpoint format with transformers"]),
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{model_id}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{model_id}")',
        "```",
        "",
        "Requires `bitsandbytes>=0.50`" + ("" if stock else f" and llmquant {meta['llmquant_version']} or later installed") + ".",
        "",
        "## Size",
        "",
        "| | bytes | bits per weight |",
        "|---|---|---|",
        f"| original ({meta['model_dtype']}) | {human_bytes(s['float_bytes'])} | {8 * s['float_bytes'] / n_params:.2f} |",
        f"| this checkpoint | {human_bytes(s['quantized_bytes'])} | {s['model_bits_per_weight']:.2f} (quantized Linear layers: {s['linear_bits_per_weight']:.2f}) |",
        "",
        "## Precision map",
        "",
        "| layers | count | format | method |",
        "|---|---|---|---|",
        *[f"| `{pat}` | {n} | {fmt} | {method} |" for pat, fmt, n, method in grouped_rows(meta["layers"])],
        "",
    ]
    auto = meta.get("auto")
    if auto:
        scored = (f"per layer, the candidate formats ({', '.join(auto['candidates'])}) were scored by the KL divergence "
                  f"their error is predicted to cause (Fisher-weighted output error on calibration text), and ")
        if auto.get("measured_kl") is not None:
            lines += [f"The formats were chosen by llmquant for a quality target of {auto['target']} nats/token (mean KL "
                      f"divergence from the float model on calibration text): {scored}the smallest mix whose measured KL "
                      f"met the target was chosen (measured {auto['measured_kl']:.4f}, predicted {auto['predicted_kl']:.4f} "
                      f"nats/token). `auto.png` shows the frontier.", ""]
        else:
            lines += [f"The formats were chosen by llmquant for a budget of {auto['target'].replace('_', ' ')}: {scored}the "
                      f"least total under the budget was chosen (predicted {auto['predicted_kl']:.4f} nats/token). "
                      f"`auto.png` shows the frontier.", ""]
    if results:
        from .results import protocol_line, table_rows

        header, rows = table_rows(results)
        lines += ["## Evaluation", "", protocol_line(results) + ".", ""]
        lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        lines += ["", "Measured by llmquant on the machine that made the checkpoint: see `results.json` for every setting.", ""]
    speed = (results or {}).get("speed")
    if speed is None and (folder / "speed.json").is_file():
        speed = json.loads((folder / "speed.json").read_text())
    if speed:
        from .bench import speed_table

        lines += ["## Speed", "", speed_table(speed)]
    check = meta.get("export_check") or {}
    lines += [
        "## How it was made",
        "",
        f"llmquant {meta['llmquant_version']} with " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if k != "python") + ".",
        _check_sentence(check),
        "",
        "The recipe that made it (also in this repository as `recipe.yaml`):",
        "",
        "```yaml",
        recipe.rstrip(),
        "```",
        "",
    ]
    return str(ModelCard("---\n" + data.to_yaml() + "\n---\n\n" + "\n".join(lines)))


def _check_sentence(check: dict) -> str:
    if not check.get("passed", True):
        return "The reload check of this checkpoint did not pass: " + str(check.get("error", "see llmquant.json")) + "."
    return (f"After writing, the checkpoint was reloaded from disk and compared with the in-memory quantized model: "
            f"{check.get('tensors_checked', '?')} tensors held exactly the chosen values, max |logit difference| "
            f"{check.get('max_abs_logit_diff', '?')} on a fixed input (tolerance {check.get('tolerance', '?')}).")
