"""Tuning a decoder layer's Linear layers at once or one group at a time (``calibration.tune.scope``), layer by layer.

For decoder layers of SmolLM2-135M-Instruct (the demo's GGUF asset, in float32): the layer's
inputs from the float model on calibration windows of the demo text's first 60% and on held-out windows of its last
40%; GPTQ NF4 (block 64) from the inputs' Hessians; then ``gptq+tune``'s tuning from GPTQ's choice toward the float
layer's outputs, once with every Linear layer at once and once by groups (q/k/v, o, gate/up, down). Prints, per layer,
the mean squared error of the layer's outputs on the held-out windows for GPTQ and both tunings, their calibration
loss and time. Not a test: figures.

    python scripts/bench_tune_scope.py                    # layers 3, 15 and 27, 32 windows of 256, 100 steps
    python scripts/bench_tune_scope.py --layers 5 --windows 64 --seqlen 512
"""

from __future__ import annotations

import argparse
import time

import torch

GROUPS = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
          ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def main() -> None:
    from llmquant import assets
    from llmquant.algorithms import ALGORITHMS
    from llmquant.algorithms.scale_search import LayerStats
    from llmquant.algorithms.tune import tune_layer
    from llmquant.calibrate import calibration_windows
    from llmquant.models import load_model, resolve_source
    from llmquant.schemes import FourBit
    from llmquant.walk import call_layer, capture, decoder_layers

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 15, 27])
    ap.add_argument("--windows", type=int, default=32, help="calibration windows (held out: a quarter as many)")
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args()

    model, tok = load_model(resolve_source("asset:smollm2-135m-instruct"), "float32", "cpu")
    text = assets.fetch("botchan", quiet=True).read_text(encoding="utf-8")
    cut = int(0.6 * len(text))
    calib_windows = calibration_windows(tok, text[:cut], args.windows, args.seqlen, 0)
    held_windows = calibration_windows(tok, text[cut:], max(1, args.windows // 4), args.seqlen, 1)
    _, layers = decoder_layers(model)
    scheme = FourBit(format="nf4")
    cpu = torch.device("cpu")

    def inputs_of(index, windows):
        xs, calls = capture(model, layers, windows.unsqueeze(1), cpu)
        for b in range(len(xs)):
            for i in range(index):
                xs[b] = call_layer(layers[i], xs[b], calls.of(b, i), cpu)
        return xs, calls.of(0, index)

    for index in args.layers:
        layer = layers[index]
        calib, call = inputs_of(index, calib_windows)
        held, _ = inputs_of(index, held_windows)
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        hessians: dict = {}

        def record(module, a, n):
            x = a[0].reshape(-1, a[0].shape[-1]).double()
            hessians[n] = hessians.get(n, 0) + x.t() @ x

        hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: record(mod, a, n)) for n, m in linears.items()]
        with torch.no_grad():
            targets = [call_layer(layer, x, call, cpu) for x in calib]
            truth = [call_layer(layer, x, call, cpu) for x in held]
        for h in hooks:
            h.remove()
        tokens = sum(x.shape[1] for x in calib)
        weights = {n: m.weight.detach().float().clone() for n, m in linears.items()}
        gptq = {n: ALGORITHMS["gptq"].quantize(w, scheme, torch.float32, LayerStats((hessians[n] / tokens).float(), tokens, {}))
                for n, w in weights.items()}

        def held_out_error(chosen) -> float:
            for n, qw in chosen.items():
                linears[n].weight.data = qw.dequantize()
            try:
                with torch.no_grad():
                    return sum(((call_layer(layer, x, call, cpu) - t) ** 2).mean().item() for x, t in zip(held, truth)) / len(held)
            finally:
                for n, w in weights.items():
                    linears[n].weight.data = w

        line = f"layer {index}: held-out MSE gptq {held_out_error(gptq):.4g}"
        for name, groups in (("at once", None), ("by groups", GROUPS)):
            t = time.perf_counter()
            tuned, report = tune_layer(layer, {n: (weights[n], gptq[n], scheme) for n in linears}, {}, calib, targets, call,
                                       cpu, {"steps": args.steps, "lr": None, "batch": 1, "seed": 0}, torch.float32,
                                       None, groups)
            line += (f"; tuned {name} {held_out_error(tuned):.4g} (calibration loss {report['loss_after']:.4g}, "
                     f"{time.perf_counter() - t:.0f} s)")
        print(line, flush=True)


if __name__ == "__main__":
    main()
