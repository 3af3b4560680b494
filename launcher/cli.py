"""The `zerotrain` command: prepare data, train, submit, plan, export, generate, predict, chat, status, report.

Everything a run needs is checked here, before any rank starts: a bad config, a missing dataset
or a run directory that would be overwritten ends the command with one line and exit code 2.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
from pathlib import Path

from data_pipeline.errors import UserError
from data_pipeline.files import write_durable
from trainer.config import ConfigError, load_config

USAGE_ERROR = 2


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.command(args) or 0
    except UserError as e:
        print(f"zerotrain: error: {e}", file=sys.stderr)
    except OSError as e:  # the environment refused (permissions, a full disk, a missing file): no traceback
        where = f"{e.filename}: " if e.filename else ""
        print(f"zerotrain: error: {where}{e.strerror or e}", file=sys.stderr)
    return USAGE_ERROR


def _prepare(args) -> None:
    from trainer.tasks import task_of

    cfg = load_config(args.config, args.set)
    if cfg.data.mode == "streaming":
        raise ConfigError("data.mode: streaming data is read as it is by `zerotrain train`; nothing to prepare")
    task_of(cfg).prepare(cfg, args.part)


def _train(args) -> int:
    from launcher.environment import detect
    from launcher.run_lock import RunLock
    from trainer.parallel.distributed import uses_gpus
    from trainer.preflight import preflight

    placed = detect()  # ranks started by srun, mpirun or torchrun: this process is one of them
    cfg = load_config(args.config, args.set + _launch_overrides(args, placed), cuda_available=uses_gpus())
    _check_rendezvous(cfg, args, placed)
    checked = preflight(cfg, args.resume, args.allow_data_change)
    resume_from = checked.resume.tag if checked.resume else None
    lock = RunLock(cfg.run_dir)
    # The job's first process owns the run directory and writes its config; the others write nothing before
    # rank 0 has joined them.
    if (placed.rank if placed else args.node_rank) == 0:
        stale = lock.acquire()
        for note in checked.notes + ([f"the previous job in {cfg.run_dir} ({stale}) ended without releasing it "
                                      "(killed?); taking over"] if stale else []):
            print(f"zerotrain: {note}", flush=True)
        write_durable(cfg.run_dir / "config.yaml", cfg.to_yaml())
        print(f"zerotrain: run {cfg.run.name}: {cfg.world_size} rank(s), logs in {cfg.run_dir / 'logs'}", flush=True)
    if checked.finished:
        print(f"zerotrain: run {cfg.run.name} already reached train.max_steps ({cfg.train.max_steps}); raise it to "
              "train on", flush=True)
        return 0
    if placed:
        _train_as_rank(cfg, placed, resume_from, lock)
    from launcher.agent import Rendezvous, run_agent

    try:
        return run_agent(cfg.run_dir / "config.yaml", cfg, resume_from,
                         Rendezvous(args.node_rank, args.master_addr, args.master_port, args.rdzv_endpoint))
    finally:
        lock.release()


def _launch_overrides(args, placed) -> list[str]:
    """The launch section as the command line or the scheduler's environment sets it."""
    if placed:
        if placed.nnodes * placed.local_world_size != placed.world_size:
            raise UserError(f"{placed.source}: {placed.world_size} ranks are not spread evenly over "
                            f"{placed.nnodes} nodes; start as many ranks on every node")
        return [f"launch.nnodes={placed.nnodes}", f"launch.nproc_per_node={placed.local_world_size}"]
    flags = {"nproc_per_node": args.nproc, "nnodes": args.nnodes, "max_restarts": args.max_restarts}
    return [f"launch.{key}={value}" for key, value in flags.items() if value is not None]


def _check_rendezvous(cfg, args, placed) -> None:
    nnodes = cfg.launch.nnodes
    if placed is None and nnodes > 1 and not (args.master_addr or args.rdzv_endpoint):
        raise ConfigError(f"launch.nnodes: {nnodes} nodes need a rendezvous: --master-addr (with --node-rank) "
                          "or --rdzv-endpoint HOST:PORT")
    if placed is None and args.node_rank >= nnodes:
        raise ConfigError(f"--node-rank: {args.node_rank} is not below the number of nodes ({nnodes})")


def _train_as_rank(cfg, placed, resume_from: str | None, lock) -> None:
    """Run this process's rank in-process (srun, mpirun, torchrun started it) and leave with its exit code."""
    import os

    from launcher.environment import set_process_defaults
    from trainer.main import exit_now, run

    os.environ.update(placed.torch_env())
    set_process_defaults(placed.local_world_size)
    code = run(cfg, resume_from)
    if placed.source == "mpi":  # mpirun counts a rank that leaves without MPI_Finalize as failed
        from mpi4py import MPI

        MPI.Finalize()
    lock.release()
    exit_now(code)


def _submit(args) -> int:
    from launcher import slurm
    from trainer.preflight import preflight

    gpus = args.gpus_per_node or 0
    ranks = gpus or args.nproc_per_node or 1
    fewest, most = args.nodes
    cfg = _submit_config(args, ranks, gpus, fewest, most)
    # NVMe offload's folder and op are checked where the job trains, not on the submitting machine
    notes = preflight(cfg, args.resume, args.allow_data_change, on_training_machine=False).notes
    request = slurm.Request(fewest, most, ranks, gpus, args.partition, args.account, args.time)
    log_dir = slurm.log_folder(cfg)
    script = slurm.render(cfg, cfg.run_dir / "config.yaml", request, Path.cwd())
    if args.dry_run:
        print(script)
        return 0
    if args.partition:
        slurm.check_partition(args.partition)
    slurm.check_not_queued(cfg.run_dir)
    for note in notes:
        print(f"zerotrain: {note}")
    log_dir.mkdir(parents=True, exist_ok=True)
    write_durable(cfg.run_dir / "config.yaml", cfg.to_yaml())
    write_durable(log_dir / "job.sbatch", script)
    job = slurm.submit(log_dir / "job.sbatch", slurm.output(cfg))
    with open(log_dir / "jobs", "a") as jobs:
        jobs.write(job + "\n")
    print(f"zerotrain: submitted job {job} ({request.nodes} node(s) x {ranks} ranks); its log: "
          f"{log_dir / f'slurm-{job}.out'}; follow it with `zerotrain status {cfg.run_dir}`")
    return 0


def _submit_config(args, ranks: int, gpus: int, fewest: int, most: int):
    """The config on the most nodes, once every node count of the range is known to keep the global batch
    (each segment of the job resumes on whatever count Slurm grants it)."""
    restarts = [f"launch.max_restarts={args.max_restarts}"] if args.max_restarts is not None else []
    for nodes in range(fewest, most + 1):
        try:
            cfg = load_config(args.config, args.set + [f"launch.nnodes={nodes}", f"launch.nproc_per_node={ranks}"]
                              + restarts, cuda_available=True if gpus else None)
        except ConfigError as e:
            if fewest == most:
                raise
            raise ConfigError(f"--nodes {fewest}-{most}: a segment on {nodes} node(s) could not keep the global "
                              f"batch ({e})") from None
    return cfg


def _plan(args) -> None:
    from launcher.plan import parse_memory, plan

    # checked for the cluster the plan is for, not the config's launch section
    cfg = load_config(args.config, args.set + [f"launch.nnodes={args.nodes}",
                                               f"launch.nproc_per_node={args.gpus_per_node}"])
    print(plan(cfg, args.nodes, args.gpus_per_node, parse_memory(args.gpu_memory)))


def _export(args) -> None:
    from trainer.checkpointing.export import export

    out, auto, damaged = export(args.run_dir.absolute(), args.out_dir.absolute(), args.tag, args.merge,
                                args.prepared_dir)
    for problem in damaged:
        print(f"zerotrain: checkpoint {problem}: exported an older one", file=sys.stderr)
    print(f"zerotrain: exported to {out} (load it with {auto}.from_pretrained)")


def _generate(args) -> None:
    from launcher.generate import generate

    if not all(prompt.strip() for prompt in args.prompt):
        raise ConfigError("--prompt: an empty prompt; give text for the model to continue")
    texts = generate(args.model_dir, args.prompt, args.max_new_tokens, args.temperature, args.seed)
    for text in texts:
        print(f"--- sample ---\n{text}\n")


def _predict(args) -> None:
    from launcher.predict import predict

    lines = _input_lines(args.input)
    try:
        for label, score, text in predict(args.model_dir, (line.rstrip("\n") for line in lines), args.batch_size):
            print(f"{label}\t{score:.4f}\t{text}", flush=True)
    except UnicodeDecodeError:  # stdin is read as it comes
        raise UserError("--input: standard input is not UTF-8 text; give texts, one per line") from None


def _chat(args) -> None:
    from launcher.chat import Chat

    chat = Chat(args.model_dir, args.system, args.max_new_tokens)
    if args.input is None and sys.stdin.isatty():
        chat.converse()
        return
    lines = _input_lines(args.input or Path("-"))
    try:
        for message, reply in chat.replies(line.rstrip("\n") for line in lines):
            print(f"> {message}\n{reply}\n", flush=True)
    except UnicodeDecodeError:
        raise UserError("--input: standard input is not UTF-8 text; give messages, one per line") from None


def _input_lines(path: Path):
    """--input's lines: a file, or (-) standard input, strictly as UTF-8 (Python would otherwise smuggle
    undecodable bytes in as surrogates)."""
    return io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8") if str(path) == "-" else _read_lines(path)


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise ConfigError(f"--input: {path}: no such file")
    try:
        return path.read_text().splitlines()
    except UnicodeDecodeError:
        raise UserError(f"--input: {path} is not UTF-8 text; give texts, one per line") from None


def _status(args) -> None:
    from launcher.status import run_status

    print(run_status(args.run_dir.absolute()))


def _report(args) -> None:
    from trainer.observe.report import compare, render

    runs = [run.absolute() for run in args.run_dirs]
    print(render(runs[0], args.output) if len(runs) == 1 else compare(runs, (args.output or COMPARED).absolute()))


COMPARED = Path("compare.png")  # where `zerotrain report RUN_DIR RUN_DIR ...` draws, unless --output says


class _Parser(argparse.ArgumentParser):
    """A misused flag is one line too, as every other refusal (argparse would print the usage first)."""

    def error(self, message: str):
        self.exit(USAGE_ERROR, f"zerotrain: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
    p = command("train", _train, "Train with DeepSpeed ZeRO, writing the run directory run.output_dir: N ranks "
                "on this machine, or this node's ranks of a multi-node job (run it on every node), or - under "
                "srun, mpirun or torchrun - one rank per process.")
    p.add_argument("--nproc", type=_positive, metavar="N", help="ranks on this machine (default: "
                   "launch.nproc_per_node)")
    p.add_argument("--nnodes", type=_positive, help="nodes of the job, each running this command (default: "
                   "launch.nnodes)")
    p.add_argument("--node-rank", type=int, default=0, help="this node's place, 0 to nnodes-1 (static "
                   "rendezvous)")
    p.add_argument("--master-addr", help="address of node 0, which serves the static rendezvous")
    p.add_argument("--master-port", type=_positive, default=29500)
    p.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="a c10d rendezvous every node reaches "
                   "(instead of --master-addr/--node-rank)")
    p.add_argument("--max-restarts", type=int, help="restart the ranks this many times after a failure, each "
                   "time from the last checkpoint (default: launch.max_restarts)")
    p.add_argument("--resume", choices=["auto", "none"], default="none",
                   help="auto: continue from the newest checkpoint in run.output_dir if there is one; "
                        "none (default): refuse a run directory that already holds checkpoints")
    p.add_argument("--allow-data-change", action="store_true",
                   help="resume although the prepared data differs from the checkpoint's (its position in "
                        "the new data's order is kept; samples may repeat or be skipped)")
    p = command("submit", _submit, "Submit the run as a Slurm batch job (slurm/zerotrain.sbatch): one rank per "
                "task, saved and requeued before its time limit or on USR1, resumed automatically.")
    p.add_argument("--nodes", type=_node_range, default=(1, 1), metavar="N|MIN-MAX",
                   help="nodes per job segment; a range lets every segment (requeued after a preemption or the time "
                        "limit) run on as many as Slurm grants, resuming at that world size")
    ranks = p.add_mutually_exclusive_group()
    ranks.add_argument("--gpus-per-node", type=_positive, metavar="G", help="GPU nodes: one rank per GPU")
    ranks.add_argument("--nproc-per-node", type=_positive, metavar="P", help="CPU nodes: P ranks per node "
                       "(default 1)")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--time", help="time limit per job segment, as sbatch takes it (e.g. 4:00:00)")
    p.add_argument("--max-restarts", type=int, help="requeue after a failure at most this many times in a "
                   "row (default: launch.max_restarts)")
    p.add_argument("--resume", choices=["auto", "none"], default="none",
                   help="auto: continue the checkpoints already in run.output_dir (the job's segments always do)")
    p.add_argument("--allow-data-change", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dry-run", action="store_true", help="print the job script; submit nothing")
    p = command("plan", _plan, "Before spending a cluster: parameters, FLOPs per token and per-GPU memory of "
                "every ZeRO stage and offload for this config on N nodes x G GPUs, what fits, and a recommendation.")
    p.add_argument("--nodes", type=_positive, default=1)
    p.add_argument("--gpus-per-node", type=_positive, default=8)
    p.add_argument("--gpu-memory", default="80GB", help="memory of one GPU, e.g. 80GB, 141GB, 24GiB")
    p = command("export", _export, "Consolidate a run's checkpoint into a Hugging Face save_pretrained "
                "folder (safetensors, config, tokenizer).", config=False)
    p.add_argument("run_dir", type=Path, help="the run directory (run.output_dir)")
    p.add_argument("out_dir", type=Path, help="where to write the model; must not exist or be empty")
    p.add_argument("--tag", help="checkpoint to export: step_00000100, best (the best validation result, "
                   "eval.best_metric) or latest (default: the newest intact one)")
    p.add_argument("--merge", action="store_true", help="a LoRA run (model.lora): the base model with the "
                   "adapters merged into its weights, a plain transformers folder (default: the adapter alone, "
                   "in PEFT's format)")
    p.add_argument("--prepared-dir", type=Path, help="where the run's prepared data (its tokenizer) is now, if "
                   "it moved (default: the checkpoint's data.prepared_dir)")
    p = command("generate", _generate, "Sample text from an exported model with plain transformers.",
                config=False)
    p.add_argument("model_dir", type=Path, help="a folder written by `zerotrain export`")
    p.add_argument("--prompt", action="append", required=True, help="a prompt to continue (repeatable)")
    p.add_argument("--max-new-tokens", type=_positive, default=50, help="at most the model's positions less the "
                   "prompt's")
    p.add_argument("--temperature", type=_temperature, default=0.8, help="sampling temperature, more than 0")
    p.add_argument("--seed", type=_seed, default=0)
    p = command("predict", _predict, "Label texts, one per line, with a classifier exported by `zerotrain "
                "export`; prints label, its probability and the text, tab-separated.", config=False)
    p.add_argument("model_dir", type=Path, help="a folder written by `zerotrain export` (model.task: "
                   "classification)")
    p.add_argument("--input", type=Path, required=True, metavar="FILE", help="texts, one per line; - reads stdin")
    p.add_argument("--batch-size", type=_positive, default=32)
    p = command("chat", _chat, "Talk to a chat model exported by `zerotrain export` (model.task: sft) through "
                "its chat template: at a terminal one conversation, turn after turn; with --input, each line a "
                "conversation of its own (its reply printed after it).", config=False)
    p.add_argument("model_dir", type=Path, help="a folder written by `zerotrain export`")
    p.add_argument("--input", type=Path, metavar="FILE", help="messages, one per line; - reads stdin")
    p.add_argument("--system", help="a system prompt before every conversation")
    p.add_argument("--max-new-tokens", type=_positive, default=256, help="the most tokens of a reply")
    p = command("status", _status, "Show where a run stands: step, losses, throughput, checkpoints.",
                config=False)
    p.add_argument("run_dir", type=Path, help="the run directory (run.output_dir)")
    p = command("report", _report, "Draw a run's curves (loss and validation loss, learning rate, tokens/s, "
                "MFU, memory, gradient norm) from its metrics.jsonl to a PNG, or several runs' in one figure to "
                "compare them; prints the file's path.", config=False)
    p.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR", help="run directories (run.output_dir)")
    p.add_argument("--output", type=Path, metavar="PNG", help="where to write the picture (default: "
                   "RUN_DIR/report.png for one run, compare.png here for several)")
    return parser


def _part(text: str) -> tuple[int, int]:
    index, sep, count = text.partition("/")
    if not (sep and index.isdigit() and count.isdigit() and 1 <= int(index) <= int(count)):
        raise argparse.ArgumentTypeError(f"expected I/N with 1 <= I <= N, e.g. 2/4 (got {text!r})")
    return int(index) - 1, int(count)


def _node_range(text: str) -> tuple[int, int]:
    fewest, sep, most = text.partition("-")
    if not (fewest.isdigit() and (not sep or most.isdigit())) or not 1 <= int(fewest) <= int(most or fewest):
        raise argparse.ArgumentTypeError(f"expected N or MIN-MAX with 1 <= MIN <= MAX, e.g. 4 or 2-4 (got {text!r})")
    return int(fewest), int(most or fewest)


def _temperature(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number more than 0 (got {text!r}); sampling divides by it")
    return value


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be from 0 to 2**32 - 1 (got {text})")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


if __name__ == "__main__":
    sys.exit(main())
