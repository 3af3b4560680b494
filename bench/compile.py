"""train.compile on the demo model (~17M-parameter Llama, 2 CPU ranks, ZeRO 2, bf16): tokens/s per rank
compiled / eager, from two real runs of the same steps in this invocation, each the median of the logged
perf/tokens_per_s_per_rank over the steps after the first (whose compiling the trainer also leaves out of the
throughput), and what compiling cost.

    .venv/bin/python bench/compile.py [--steps 40] [--attention sdpa]
"""

import argparse

from demo_runs import prepare, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--attention", default="sdpa", help="model.attention (sdpa, eager)")
    args = parser.parse_args()
    prepare()
    sets = [f"train.max_steps={args.steps}", f"model.attention={args.attention}"]
    runs = {name: train([*sets, f"train.compile={on}"]) for name, on in (("eager", "false"), ("compiled", "true"))}
    rate = {name: run.median("perf/tokens_per_s_per_rank") for name, run in runs.items()}
    last = {name: next(r for r in reversed(run.records) if "train/loss" in r) for name, run in runs.items()}
    print(f"{args.attention} attention, {args.steps} steps: tokens/s per rank eager {rate['eager']:,.0f}, compiled "
          f"{rate['compiled']:,.0f}: compiled / eager {rate['compiled'] / rate['eager']:.2f}x")
    print(f"MFU eager {runs['eager'].median('perf/mfu'):.3f}, compiled {runs['compiled'].median('perf/mfu'):.3f}; "
          f"loss at step "
          f"{args.steps} eager {last['eager']['train/loss']:.4f}, compiled {last['compiled']['train/loss']:.4f}")
    print(f"rank 0: {runs['compiled'].log_line('compiled in')}")


if __name__ == "__main__":
    main()
