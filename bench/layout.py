"""Memory layout: what channels-last (NHWC) would change, for Adversa and for the peers.

    .venv/bin/python -m bench.layout [--n 128] [--repeats 3] [--out bench/results]

Every other bench runs the hosted module in PyTorch's default layout (NCHW), for Adversa and the
peers alike. On this CPU, oneDNN's channels-last convolutions are faster; this bench measures by
how much, for one bare forward+backward and for three attacks (FGSM, DeepFool L2, C&W (A)), each
run by Adversa and by a peer, with the module in each layout, all rows timed round-robin on the
same ``--n`` images. It answers two questions: would the service gain from serving models
channels-last, and do the speed-ups of the other benches hold when both sides use it. Writes
``layout-<model>.md`` and ``.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench import attacks as base
from bench import cw as cw_bench
from bench import peers as peer_lib
from workers.attacks.cw import CarliniWagnerL2Spec, carlini_wagner_l2
from workers.attacks.deepfool import DeepFoolSpec, deepfool
from workers.attacks.fgsm import FGSMSpec, fgsm
from workers.classifier import Classifier

LAYOUTS = {"NCHW": torch.contiguous_format, "NHWC": torch.channels_last}


def rows_to_time(bench: base.Bench) -> list[tuple[str, str, str, Callable[[], Any]]]:
    """(attack, implementation, layout, run) for every combination."""
    import torchattacks  # the ``bench`` extra

    x, y = bench.x, bench.y
    card_model = bench.model
    df = DeepFoolSpec(norm="l2", overshoot=base.DF_OVERSHOOT, max_iter=base.DF_STEPS, candidates=10)
    cw = CarliniWagnerL2Spec(binary_search_steps=1, max_iter=cw_bench.STEPS, learning_rate=cw_bench.LR,
                             initial_const=cw_bench.TA_C, abort_early=False)
    out: list[tuple[str, str, str, Callable[[], Any]]] = []
    for layout, fmt in LAYOUTS.items():
        module = base.fresh_module().to(memory_format=fmt)
        ours = Classifier(module, card_model.num_classes, card_model.input_shape, card_model.bounds)
        peer = base.fresh_module().to(memory_format=fmt)

        def bare(m: nn.Module = module) -> None:
            base.forward_backward(m, x, y)

        fb_deepfool = peer_lib.foolbox_makers(base.EPS, base.PGD_STEPS, base.PGD_ALPHA, base.DF_STEPS,
                                              base.DF_OVERSHOOT)["DeepFool"][0](peer)
        ta_fgsm = torchattacks.FGSM(peer, eps=base.EPS)
        ta_cw = torchattacks.CW(peer, c=cw_bench.TA_C, kappa=0, steps=cw_bench.STEPS, lr=cw_bench.LR)
        out += [
            ("forward+backward", "bare module", layout, bare),
            ("FGSM", "adversa", layout, lambda m=ours: fgsm(m, x, y, FGSMSpec(eps=base.EPS, check=False))),
            ("FGSM", "torchattacks", layout, lambda a=ta_fgsm: a(x, y)),
            ("DeepFool", "adversa", layout, lambda m=ours: deepfool(m, x, y, df)),
            ("DeepFool", "foolbox", layout, lambda a=fb_deepfool: a(x, y)),
            ("C&W (A) no abort", "adversa", layout, lambda m=ours: carlini_wagner_l2(m, x, y, cw)),
            ("C&W (A) no abort", "torchattacks", layout, lambda a=ta_cw: a(x, y)),
        ]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--n", type=int, default=128, help="images, one chunk (default 128)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row, median kept (default 3)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    bench = base.load(args.n, args.n, base.FB_REPS, args.repeats)
    todo = rows_to_time(bench)
    measured = base.time_round_robin([run for *_, run in todo], args.repeats)
    seconds = {(a, impl, lay): s for (a, impl, lay, _), (_, s, _) in zip(todo, measured, strict=True)}
    lines = ["| attack | implementation | NCHW s | NHWC s | NHWC speed-up |", "|---|---|---|---|---|"]
    for attack, impl in dict.fromkeys((a, i) for a, i, _, _ in todo):
        nchw, nhwc = seconds[(attack, impl, "NCHW")], seconds[(attack, impl, "NHWC")]
        lines.append(f"| {attack} | {impl} | {nchw:.4f} | {nhwc:.4f} | {nchw / nhwc:.2f}x |")
    ratios = ["", "| attack | peer | speed-up, both NCHW | speed-up, both NHWC | Adversa NHWC vs peer NCHW |",
              "|---|---|---|---|---|"]
    pairs = (("FGSM", "torchattacks"), ("DeepFool", "foolbox"), ("C&W (A) no abort", "torchattacks"))
    for attack, peer in pairs:
        def s(impl: str, lay: str, a: str = attack) -> float:
            return seconds[(a, impl, lay)]
        ratios.append(f"| {attack} | {peer} | {s(peer, 'NCHW') / s('adversa', 'NCHW'):.2f}x | "
                      f"{s(peer, 'NHWC') / s('adversa', 'NHWC'):.2f}x | "
                      f"{s(peer, 'NCHW') / s('adversa', 'NHWC'):.2f}x |")
    command = base.command_line("layout", argv)
    meta = {"model": base.MODEL, "command": command.strip(), "n": args.n, "repeats": args.repeats,
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "wall_seconds": time.perf_counter() - start}
    text = [f"# Memory layout (NCHW / channels-last NHWC): {base.MODEL}", "",
            f"Command: `{meta['command']}`", "",
            f"- date: {meta['date']}; torch {meta['torch']}, CPU, {meta['threads']} threads; {args.n} test "
            f"images in one chunk; median of {args.repeats} runs per row, all rows round-robin; wall time "
            f"{meta['wall_seconds']:.0f} s", "- settings of each attack: as in `bench.attacks` and `bench.cw`.",
            "", *lines, *ratios, ""]
    print("\n".join(text))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"layout-{base.MODEL}"
    stem.with_suffix(".md").write_text("\n".join(text))
    rows = [{"attack": a, "implementation": i, "layout": lay, "seconds": sec}
            for (a, i, lay), sec in seconds.items()]
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
