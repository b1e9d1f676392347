"""Task accuracy through lm-evaluation-harness, on an already-loaded model.

Any task lm-eval knows works when its dataset is reachable (hellaswag, piqa,
arc_easy, arc_challenge, winogrande, lambada_openai, ...). llmquant also ships
offline tasks built from its demo text (``llmquant/eval_tasks/``, package data): ``botchan_cloze`` (predict a
passage's last word, like LAMBADA) and ``botchan_continuation`` (pick the true next
sentence among four).
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from pathlib import Path

from ..errors import UserError

# Tasks shipped with llmquant (lm-eval YAML + the code that builds their data), installed with the package.
TASKS_DIR = Path(__file__).resolve().parent.parent / "eval_tasks"


def tasks_dir() -> Path:
    return TASKS_DIR


def _manager():
    from lm_eval.tasks import TaskManager

    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return TaskManager(include_path=str(tasks_dir()))


def check_tasks(tasks: list[str]):
    """Refuse unknown task names before any heavy work; returns lm-eval's task manager."""
    if not tasks:
        return None
    manager = _manager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        local = ", ".join(sorted(n for n in manager.all_tasks if n.startswith("botchan")))
        raise UserError(f"unknown lm-eval task {unknown[0]!r}; llmquant's offline tasks: {local} (and any lm-eval task name)")
    return manager


def run_tasks(model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 8, num_fewshot: int = 0,
              device=None) -> dict:
    """``{task: {"acc": ..., "acc_stderr": ..., ...}}`` for each task (lm-eval's metric names). ``device``: where a
    model offloaded by accelerate computes (its parameters then report the meta device)."""
    if not tasks:
        return {}
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    manager = check_tasks(tasks)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    if lm.device.type == "meta":  # lm-eval takes the model's device for its inputs and autocast; accelerate's hooks
        lm._device = torch.device(device or "cpu")  # move the inputs on from there
    try:
        with contextlib.redirect_stdout(sys.stderr):  # lm-eval prints progress notes; keep stdout for results
            out = simple_evaluate(
                model=lm, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot, task_manager=manager,
                log_samples=False, bootstrap_iters=1000, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
            )
    except (ConnectionError, OSError) as e:
        raise UserError(f"lm-eval could not load the data of {', '.join(tasks)}: {str(e).splitlines()[0]}") from None
    results = {}
    for task, metrics in out["results"].items():
        clean = {}
        for key, value in metrics.items():
            if key in ("alias", "sample_len") or not isinstance(value, (int, float)):
                continue
            name = key.split(",")[0]  # "acc,none" -> "acc", "acc_stderr,none" -> "acc_stderr"
            clean[name] = float(value) if not (isinstance(value, float) and math.isnan(value)) else None
        clean["samples"] = out.get("n-samples", {}).get(task, {}).get("effective")
        results[task] = clean
    return results
