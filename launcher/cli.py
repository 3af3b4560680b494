"""The `zerotrain` command: prepare data, train, export, generate, status.

Everything a run needs is checked here, before any rank starts: a bad config, a missing dataset
or a run directory that would be overwritten ends the command with one line and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_pipeline.errors import DataError
from trainer.config import ConfigError, load_config

USAGE_ERROR = 2


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.command(args) or 0
    except (ConfigError, DataError) as e:
        print(f"zerotrain: error: {e}", file=sys.stderr)
        return USAGE_ERROR


def _prepare(args) -> None:
    from data_pipeline import prepare

    cfg = load_config(args.config, args.set)
    if cfg.data.mode == "streaming":
        raise ConfigError("data.mode: streaming data is read as it is by `zerotrain train`; nothing to prepare")
    prepare(cfg.data, cfg.tokenizer, part=args.part)


def _train(args) -> int:
    import torch
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from launcher.local import launch_local
    from trainer import checkpoint
    from trainer.data import corpus
    from trainer.model import model_config
    from trainer.validation import validation_batch_counts

    overrides = args.set + ([f"launch.nproc_per_node={args.nproc}"] if args.nproc else [])
    cfg = load_config(args.config, overrides, cuda_available=torch.cuda.is_available())
    data = corpus(cfg)
    model_config(cfg.model, data.vocab_size)  # an init_from model must fit the data's vocabulary
    if data.manifest:
        validation_batch_counts(cfg, data.manifest)
    _check_resume(cfg, data.fingerprint, args.resume, args.allow_data_change)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    config_file = cfg.run_dir / "config.yaml"
    config_file.write_text(cfg.to_yaml())
    print(f"zerotrain: run {cfg.run.name}: {cfg.world_size} rank(s), logs in {cfg.run_dir / 'logs'}", flush=True)
    saved_before = checkpoint.latest_tag(cfg.run_dir)
    try:
        launch_local(config_file, cfg.world_size, args.resume, cfg.run_dir / "logs", cfg.launch.stop_timeout)
    except SignalException as e:
        saved = checkpoint.latest_tag(cfg.run_dir)
        if saved == saved_before:
            print(f"zerotrain: stopped by {e.sigval.name} before a checkpoint was saved", file=sys.stderr)
            return 1
        print(f"zerotrain: stopped by {e.sigval.name}; saved {saved}: continue with --resume auto", file=sys.stderr)
        return checkpoint.EXIT_SAVED
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        # The error file holds {"message": "Type: text", "extraInfo": {traceback...}}; the rank has already
        # printed the traceback, so one line names the cause here.
        message = failure.message.get("message", failure.message) if isinstance(failure.message, dict) \
            else failure.message
        print(f"zerotrain: rank {rank} failed (exit code {failure.exitcode}): {message}\n"
              f"zerotrain: its log: {cfg.run_dir / 'logs' / f'rank{rank}.log'}", file=sys.stderr)
        return 1
    print(f"zerotrain: run {cfg.run.name} finished; `zerotrain status {cfg.run_dir}` summarises it")
    return 0


def _check_resume(cfg, data_fingerprint: str, resume: str, allow_data_change: bool) -> None:
    """Never overwrite a run by accident, and refuse resuming what cannot continue exactly."""
    from trainer import checkpoint

    tags = checkpoint.saved_tags(checkpoint.checkpoints_dir(cfg.run_dir))
    if not tags:
        return
    if resume == "none":
        raise ConfigError(f"run.output_dir: {cfg.run_dir} already holds checkpoints (latest {tags[-1]}); "
                          "pass --resume auto to continue it, or choose another run.output_dir")
    tag, damaged = checkpoint.newest_intact(cfg.run_dir, checksums=False)  # the ranks verify checksums too
    for problem in damaged:
        print(f"zerotrain: checkpoint {problem}; falling back to an older one", file=sys.stderr)
    if tag is None:
        raise ConfigError(f"run.output_dir: no intact checkpoint in {checkpoint.checkpoints_dir(cfg.run_dir)} "
                          "to resume from")
    state = checkpoint.read_state(cfg.run_dir, tag)
    if state.data_fingerprint != data_fingerprint and not allow_data_change:
        raise DataError(f"data.prepared_dir: checkpoint {tag} was trained on other prepared data (corpus or "
                        "tokenizer changed); resume with the data it was trained on, or pass --allow-data-change")
    saved_ranks = checkpoint.saved_world_size(cfg.run_dir, tag)
    if saved_ranks != cfg.world_size:
        if cfg.data.mode == "streaming":
            raise ConfigError(f"launch.nproc_per_node: checkpoint {tag} was saved by {saved_ranks} ranks; streaming "
                              "data resumes on as many ranks only (prepared data resumes on any number)")
        print(f"zerotrain: checkpoint {tag} was saved by {saved_ranks} ranks; resuming on {cfg.world_size} "
              f"(global batch {cfg.train.global_batch_size} kept, gradient accumulation {cfg.grad_accum})",
              flush=True)
        if checkpoint.partitioned(cfg.run_dir, tag):
            print("zerotrain: converting its ZeRO partitions to a universal checkpoint", flush=True)
            checkpoint.convert_to_universal(cfg.run_dir, tag)


def _export(args) -> None:
    from trainer.export import export

    out = export(args.run_dir.absolute(), args.out_dir.absolute(), args.tag)
    print(f"zerotrain: exported to {out} (load it with AutoModelForCausalLM.from_pretrained)")


def _generate(args) -> None:
    from launcher.generate import generate

    if not (args.model_dir / "config.json").is_file():
        raise ConfigError(f"{args.model_dir}: not a Hugging Face model folder (no config.json)")
    texts = generate(args.model_dir, args.prompt, args.max_new_tokens, args.temperature, args.seed)
    for text in texts:
        print(f"--- sample ---\n{text}\n")


def _status(args) -> None:
    from launcher.status import run_status

    print(run_status(args.run_dir.absolute()))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zerotrain",
        description="Pretrain and fine-tune Hugging Face language models with DeepSpeed ZeRO.",
        epilog="Example: zerotrain prepare configs/demo.yaml && zerotrain train configs/demo.yaml --nproc 2",
    )
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    def command(name: str, func, help: str, config: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(command=func)
        if config:
            p.add_argument("config", type=Path, help="the run's YAML config (see configs/)")
            p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                           help="override a config value by its dotted path, e.g. --set train.max_steps=20 "
                                "(repeatable; VALUE is parsed as YAML)")
        return p

    p = command("prepare", _prepare, "Train or load the tokenizer and write the token shards for the config's "
                "data section; reuses what is already prepared from the same inputs and resumes an interrupted "
                "prepare.")
    p.add_argument("--part", type=_part, default=(0, 1), metavar="I/N",
                   help="prepare only part I of N (1-based) of the chunks, e.g. one part per node sharing "
                        "data.prepared_dir; the part finishing last writes the manifest")
    p = command("train", _train, "Train on this machine with N ranks (DeepSpeed ZeRO), writing the run "
                "directory run.output_dir.")
    p.add_argument("--nproc", type=_positive, metavar="N", help="ranks on this machine (default: "
                   "launch.nproc_per_node)")
    p.add_argument("--resume", choices=["auto", "none"], default="none",
                   help="auto: continue from the newest checkpoint in run.output_dir if there is one; "
                        "none (default): refuse a run directory that already holds checkpoints")
    p.add_argument("--allow-data-change", action="store_true",
                   help="resume although the prepared data differs from the checkpoint's (its position in "
                        "the new data's order is kept; samples may repeat or be skipped)")
    p = command("export", _export, "Consolidate a run's checkpoint into a Hugging Face save_pretrained "
                "folder (safetensors, config, tokenizer).", config=False)
    p.add_argument("run_dir", type=Path, help="the run directory (run.output_dir)")
    p.add_argument("out_dir", type=Path, help="where to write the model; must not exist or be empty")
    p.add_argument("--tag", help="checkpoint to export, e.g. step_00000100 (default: the latest)")
    p = command("generate", _generate, "Sample text from an exported model with plain transformers.",
                config=False)
    p.add_argument("model_dir", type=Path, help="a folder written by `zerotrain export`")
    p.add_argument("--prompt", action="append", required=True, help="a prompt to continue (repeatable)")
    p.add_argument("--max-new-tokens", type=_positive, default=50)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    p = command("status", _status, "Show where a run stands: step, losses, throughput, checkpoints.",
                config=False)
    p.add_argument("run_dir", type=Path, help="the run directory (run.output_dir)")
    return parser


def _part(text: str) -> tuple[int, int]:
    index, sep, count = text.partition("/")
    if not (sep and index.isdigit() and count.isdigit() and 1 <= int(index) <= int(count)):
        raise argparse.ArgumentTypeError(f"expected I/N with 1 <= I <= N, e.g. 2/4 (got {text!r})")
    return int(index) - 1, int(count)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


if __name__ == "__main__":
    sys.exit(main())
