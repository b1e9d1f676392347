"""Example recipes shipped with llmquant; ``llmquant init NAME`` writes one out to start from."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError

HERE = Path(__file__).resolve().parent

# name: what the recipe does (the file is NAME.yaml beside this module)
RECIPES = {
    "demo": "the offline demo: SmolLM2-135M, NF4 + INT8 attention, GPTQ on a novel, evaluated and checked (CPU, minutes)",
    "auto": "the demo model with formats chosen for a 4.5 bits-per-weight budget (quantization.auto)",
    "nf4": "Llama-3-8B-Instruct in stock NF4 with double quantization (loads with no llmquant installed)",
    "mixed": "Llama-3-8B-Instruct, INT8 in the most sensitive layers and NF4 elsewhere",
    "gptq": "Llama-3-8B-Instruct, AWQ+GPTQ NF4 calibrated and evaluated on WikiText-2",
}


def recipe_text(name: str) -> str:
    if name not in RECIPES:
        raise UserError(f"unknown example recipe {name!r}; choose one of: {', '.join(RECIPES)}")
    return (HERE / f"{name}.yaml").read_text(encoding="utf-8")
