"""MFU of zerotrain on this CPU: a ~20-100M-parameter Llama at sequence length 256, 2 ranks, bf16, against
the peak each rank measures with a matmul probe at start-up (trainer/perf.py; the figure the trainer logs).

Trains `--steps` steps with the real CLI and reports the medians of the logged perf/mfu, model TFLOP/s and
tokens/s per rank over the steps after the first (start-up).

    .venv/bin/python bench/mfu_cpu.py [--hidden 512] [--layers 8] [--micro-batch 4] [--steps 12] [--compile]
"""

import argparse

from demo_runs import prepare, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--compile", action="store_true", help="train.compile: true")
    args = parser.parse_args()
    prepare()
    run = train([f"model.config.hidden_size={args.hidden}", f"model.config.intermediate_size={args.hidden * 8 // 3}",
                 f"model.config.num_hidden_layers={args.layers}", f"model.config.num_attention_heads={args.hidden // 64}",
                 f"model.config.num_key_value_heads={args.hidden // 64}", "data.seq_len=256",
                 f"train.micro_batch_size={args.micro_batch}", f"train.global_batch_size={2 * args.micro_batch}",
                 f"train.max_steps={args.steps}", f"train.precision={args.precision}", f"train.compile={args.compile}"])
    median = {key: run.median(key) for key in ("perf/mfu", "perf/model_tflops_per_rank", "perf/tokens_per_s_per_rank")}
    print(f"{run.log_line('parameters')}\n{run.log_line('MFU against')}\nmedians over steps 2-{args.steps}: MFU "
          f"{median['perf/mfu']:.3f}, {median['perf/model_tflops_per_rank']:.3f} TFLOP/s and "
          f"{median['perf/tokens_per_s_per_rank']:,.0f} tokens/s per rank")


if __name__ == "__main__":
    main()
