"""The configuration: presets load, overrides apply, every bad config is refused with one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from helpers import REPO, TINY, refused, zerotrain
from trainer.config import ConfigError, load_config
from trainer.engine.deepspeed_config import deepspeed_config
from trainer.engine.nvme import check_nvme_offload
from trainer.model.build import model_config


def test_presets_load_and_resolve_paths():
    for name in ("demo.yaml", "tiny.yaml", "finetune_sentiment.yaml"):
        cfg = load_config(REPO / "configs" / name, cuda_available=False)
        assert cfg.run_dir.is_absolute() and cfg.data.prepared_dir.is_absolute()
        assert all(Path(s.path).is_absolute() for s in cfg.data.sources)
    assert cfg.tokenizer.path == cfg.model.init_from  # a classifier reads with its own model's tokenizer
    tiny = load_config(TINY)
    assert tiny.grad_accum == tiny.train.global_batch_size // (tiny.train.micro_batch_size * tiny.world_size)


def test_overrides_keep_yaml_types():
    cfg = load_config(TINY, ["train.max_steps=20", "zero.stage=3", "optim.betas=[0.8, 0.9]",
                             "run.output_dir=/tmp/x", "checkpoint.every=5"])
    assert (cfg.train.max_steps, cfg.zero.stage, cfg.optim.betas) == (20, 3, (0.8, 0.9))
    assert (cfg.run_dir, cfg.checkpoint.every) == (Path("/tmp/x"), 5)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(TINY, ["train.max_steps=3"])
    (tmp_path / "config.yaml").write_text(cfg.to_yaml())
    assert load_config(tmp_path / "config.yaml") == cfg


BAD = [
    (["train.max_stepz=3"], "train.max_stepz: unknown key"),
    (["zero.stage=4"], "zero.stage: input should be 0, 1, 2 or 3"),
    (["train.max_steps=ten"], "train.max_steps: input should be a valid integer"),
    (["train.max_steps=0"], "train.max_steps: input should be greater than or equal to 1"),
    (["optim.lr=-1"], "optim.lr: input should be greater than 0"),
    (["train.precision=fp8"], "train.precision: input should be 'bf16', 'fp16' or 'fp32'"),
    (["train.global_batch_size=12"], "train.global_batch_size: 12 is not divisible by train.micro_batch_size (4) x world size (2)"),
    (["launch.nproc_per_node=3"], "train.global_batch_size: 16 is not divisible by train.micro_batch_size (4) x world size (3)"),
    (["launch.nnodes=3"], "train.global_batch_size: 16 is not divisible by train.micro_batch_size (4) x world size (6)"),
    (["train.precision=fp16"], "train.precision: fp16 needs a CUDA GPU"),
    (["optim.warmup_steps=100"], "optim.warmup_steps: 100 exceeds train.max_steps (12)"),
    (["zero.offload_param=cpu"], "zero.offload_param: parameter offload needs zero.stage 3"),
    (["zero.stage=0", "zero.offload_optimizer=cpu"], "zero.offload_optimizer: optimizer offload needs zero.stage 1, 2 or 3"),
    (["model.type=not_a_model"], "model.type: 'not_a_model' is not a transformers model type"),
    (["model.config.hiden_size=3"], "model.config.hiden_size: not a field of LlamaConfig"),
    (["model.config.vocab_size=100"], "model.config.vocab_size: set by the tokenizer"),
    (["data.seq_len=4"], "data.seq_len: input should be greater than or equal to 8"),
    (["data.sources=[]"], "data.sources: list should have at least 1 item"),
    (["run.name=a b"], "run.name: string should match pattern"),
    (["run=3"], "run: expected a section"),
    (["data.mode=streaming"], "tokenizer.path: streaming mode trains no tokenizer"),
    (["data.mode=streaming", "tokenizer.path=/tmp/tok", "data.sources=[{hub: org/x}]"], "data.sources: streaming mode reads one source of local files"),
    (["data.sources=[{path: a.txt, hub: org/x}]"], "data.sources.0: value error, give exactly one of `path`"),
    (["data.sources=[{path: a.txt, weight: 2}, b.txt]"], "data.sources: value error, give every source a `weight`, or none"),
    (["train"], "--set 'train': expected KEY=VALUE"),
    (["eval.early_stopping=2"], "eval.early_stopping: needs eval.best_metric"),
    (["eval.best_metric=val/accuracy"], "eval.best_metric: val/accuracy is a classification metric"),
    (["model.task=classification"], "tokenizer.path: classification tokenizes with the model's own tokenizer"),
    (["model.task=classification", "tokenizer.path=/tmp/tok", "eval.best_metric=val/ppl"],
     "eval.best_metric: val/ppl is a language-model metric"),
    (["data.labels=[one]"], "data.labels: list should have at least 2 items"),
    (["run.name.first=x"], "--set run.name.first: run.name is not a section"),
    (["parallel.sequence=3"], "parallel.sequence: 3 does not divide the world size (2)"),
    (["parallel.sequence=2", "data.seq_len=33", "model.config.max_position_embeddings=64"],
     "parallel.sequence: 2 does not divide data.seq_len (33)"),
    (["parallel.sequence=2", "train.global_batch_size=6"],
     "train.global_batch_size: 6 is not divisible by train.micro_batch_size (4) x data-parallel degree"),
    (["parallel.tensor=3"], "parallel.tensor: 3 does not divide the world size (2)"),
    (["parallel.tensor=2", "zero.stage=3"], "parallel.tensor: DeepSpeed 0.19.8 cannot initialise tensor parallelism"),
    (["parallel.tensor=2", "parallel.sequence=2", "launch.nproc_per_node=4", "train.global_batch_size=4"],
     "parallel.tensor: does not compose with parallel.sequence"),
    (["parallel.tensor=2", "train.global_batch_size=6"],
     "train.global_batch_size: 6 is not divisible by train.micro_batch_size (4) x data-parallel degree"),
    (["train.precision=bf16", "zero.stage=0", "train.grad_accum_dtype=fp32"],
     "train.grad_accum_dtype: DeepSpeed 0.19.8 accumulates bf16 gradients in fp32 only under ZeRO"),
    (["train.precision=fp32", "train.grad_accum_dtype=bf16"], "train.grad_accum_dtype: bf16 under fp32 training"),
    (["train.precision=fp16", "train.grad_accum_dtype=fp32"],
     "train.grad_accum_dtype: fp32 accumulation is supported under bf16 here"),
    (["run.name=.."], "run.name: value error, a name of dots only names a folder above the one it is in"),
    (["run.output_dir=/tmp/zt/prepared/run", "data.prepared_dir=/tmp/zt/prepared"],
     "run.output_dir: /tmp/zt/prepared/run is inside data.prepared_dir (/tmp/zt/prepared)"),
    (["run.output_dir=/tmp/zt/run", "data.prepared_dir=/tmp/zt/run/prepared"],
     "data.prepared_dir: /tmp/zt/run/prepared is inside run.output_dir (/tmp/zt/run)"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[b[1].split(":")[0] for b in BAD])
def test_bad_config_names_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides, cuda_available=False)
    assert str(err.value).lower().startswith(message.lower()), str(err.value)
    assert "\n" not in str(err.value)


def test_transformers_own_checks_name_model_config():
    cfg = load_config(TINY, ["model.config.num_attention_heads=3", "model.config.num_key_value_heads=3"])
    with pytest.raises(ConfigError, match=r"^model\.config: The hidden size \(64\) is not a multiple of the "
                                          r"number of attention heads \(3\)\.$"):
        model_config(cfg.model, vocab_size=512)


def test_missing_required_key(tmp_path):
    raw = yaml.safe_load(TINY.read_text())
    del raw["train"]["max_steps"]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"^train\.max_steps: required key is missing$"):
        load_config(tmp_path / "c.yaml")


def test_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "broken.yaml").write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: line \d+ not valid YAML"):
        load_config(tmp_path / "broken.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(tmp_path / "list.yaml")


def test_cli_refuses_bad_config_before_starting_anything(tmp_path):
    run_dir = tmp_path / "run"
    result = zerotrain("train", TINY, "--set", f"run.output_dir={run_dir}", "--set", "zero.stage=7", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "zerotrain: error: zero.stage: input should be 0, 1, 2 or 3 (got 7)"]
    assert not run_dir.exists()


def test_cli_refuses_unprepared_data(tmp_path):
    result = refused("train", TINY, "--set", f"run.output_dir={tmp_path / 'run'}",
                     "--set", f"data.prepared_dir={tmp_path / 'nothing'}")
    assert "data.prepared_dir" in result.stderr and "zerotrain prepare" in result.stderr
    assert not (tmp_path / "run").exists()


def test_cli_refuses_missing_sources(tmp_path):
    result = zerotrain("prepare", TINY, "--set", f"data.sources=[{tmp_path}/*.txt]",
                       "--set", f"data.prepared_dir={tmp_path / 'p'}", check=False)
    assert result.returncode == 2
    assert "data.sources" in result.stderr and "matches no file" in result.stderr


@pytest.mark.parametrize("command", ["", "prepare", "train", "export", "generate", "predict", "status", "report"])
def test_help(command):
    result = zerotrain(*([command] if command else []), "--help")
    assert "usage: zerotrain" in result.stdout
    if command == "train":
        assert "--nproc" in result.stdout and "--resume" in result.stdout and "--set" in result.stdout


@pytest.mark.parametrize("overrides,message", [
    (["data.seq_len=50000", "model.config.max_position_embeddings=50000"],
     "data.validation_fraction: the validation split holds 0 micro-batch(es) of 4 x 50000 tokens, fewer than the 2 ranks"),
    (["eval.batches=1"], "eval.batches: 1 validation micro-batches cannot be shared by the 2 ranks"),
], ids=["split too small", "too few batches asked"])
def test_cli_refuses_validation_the_ranks_cannot_share_naming_the_cause(overrides, message, tiny_data, tmp_path):
    sets = [a for o in [f"run.output_dir={tmp_path / 'run'}", f"data.prepared_dir={tiny_data}", *overrides]
            for a in ("--set", o)]
    result = refused("train", TINY, *sets)
    assert result.stderr.startswith(f"zerotrain: error: {message}"), result.stderr
    assert not (tmp_path / "run").exists()


NVME = ["zero.stage=3", "zero.offload_optimizer=nvme", "zero.offload_param=nvme", "zero.nvme_path=swap"]
BAD_OFFLOAD = [
    (["zero.stage=2", "zero.offload_optimizer=nvme", "zero.nvme_path=/tmp/s"],
     "zero.offload_optimizer: nvme offload needs zero.stage 3 (got stage 2)"),
    (["zero.stage=3", "zero.offload_optimizer=nvme"], "zero.nvme_path: required with nvme offload"),
    (["zero.stage=3", "zero.offload_param=nvme"], "zero.nvme_path: required with nvme offload"),
    (["zero.offload_param=nvme", "zero.nvme_path=/tmp/s"], "zero.offload_param: parameter offload needs zero.stage 3"),
    (["zero.offload_optimizer=disk"], "zero.offload_optimizer: input should be 'none', 'cpu' or 'nvme'"),
    (NVME + ["zero.partitioned_init=false"], "zero.partitioned_init: fp32 parameter offload to nvme on CPU needs"),
]


@pytest.mark.parametrize("overrides,message", BAD_OFFLOAD, ids=[" ".join(b[0][:2]) for b in BAD_OFFLOAD])
def test_bad_offload_config_names_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides, cuda_available=False)
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


def test_nvme_offload_becomes_deepspeed_settings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(TINY, NVME, cuda_available=False)
    assert cfg.zero.nvme_path == tmp_path / "swap"  # relative to where the command runs, like every path
    assert load_config(TINY, NVME + ["train.precision=bf16", "zero.partitioned_init=false"], cuda_available=False)
    assert load_config(TINY, NVME, cuda_available=True)  # the bf16 swap buffers are a CPU-only DeepSpeed quirk
    ds = deepspeed_config(cfg, 6_000_000, largest_parameter=1_048_577)
    zero, folder = ds["zero_optimization"], str(tmp_path / "swap" / "tiny")  # a folder per run name
    assert zero["offload_optimizer"] == {"device": "nvme", "nvme_path": folder, "buffer_count": 4}
    # One rank's share of the largest parameter (rounded up) fits a swap buffer; nothing kept in memory.
    assert zero["offload_param"] == {"device": "nvme", "nvme_path": folder, "buffer_count": 5,
                                     "buffer_size": 524_289, "max_in_cpu": 0}
    assert zero["stage3_max_reuse_distance"] == 0 and ds["aio"]["block_size"] == 1024**2
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    DeepSpeedZeroConfig(**zero)  # DeepSpeed accepts it
    cpu = deepspeed_config(load_config(TINY, ["zero.stage=3", "zero.offload_optimizer=cpu"]), 6_000_000)
    assert cpu["zero_optimization"]["offload_optimizer"] == {"device": "cpu"} and "aio" not in cpu


def test_nvme_preflight_needs_a_writable_folder_and_libaio(tmp_path, monkeypatch):
    cfg = load_config(TINY, NVME[:-1] + [f"zero.nvme_path={tmp_path / 'new' / 'swap'}"], cuda_available=False)
    monkeypatch.setattr("trainer.engine.nvme.async_io_available", lambda: False)
    with pytest.raises(ConfigError) as err:
        check_nvme_offload(cfg)
    assert str(err.value).startswith("zero.offload_optimizer: nvme offload needs DeepSpeed's async_io op, which "
                                     "needs libaio")
    assert (tmp_path / "new" / "swap" / "tiny").is_dir()  # a missing folder is created first
    (tmp_path / "file").write_text("")
    cfg = load_config(TINY, NVME[:-1] + [f"zero.nvme_path={tmp_path / 'file'}"], cuda_available=False)
    with pytest.raises(ConfigError) as err:
        check_nvme_offload(cfg)
    assert str(err.value) == f"zero.nvme_path: cannot write swap files in {tmp_path / 'file' / 'tiny'} " \
        "(Not a directory)"
    check_nvme_offload(load_config(TINY, ["zero.stage=3", "zero.offload_param=cpu"]))  # nothing to check


def test_every_field_declares_what_a_resume_may_do():
    from data_pipeline.config import DATA, FIXED, MAY_CHANGE
    from trainer.config import dotted, resume_changes, resume_policy

    cfg = load_config(TINY)
    assert {resume_policy(key) for key in dotted(cfg.model_dump(mode="json"))} == {FIXED, MAY_CHANGE, DATA}
    expected = {"optim.lr": MAY_CHANGE, "train.max_steps": MAY_CHANGE, "checkpoint.async_": MAY_CHANGE,
                "parallel.sequence": MAY_CHANGE, "data.num_workers": MAY_CHANGE, "run.seed": FIXED,
                "data.seq_len": FIXED, "model.config.hidden_size": FIXED, "zero.stage": FIXED,
                "train.precision": FIXED, "data.sources": DATA, "tokenizer.vocab_size": DATA}
    assert {key: resume_policy(key) for key in expected} == expected
    changed = load_config(TINY, ["optim.lr=1e-4", "data.seq_len=16", "run.seed=8", "tokenizer.vocab_size=1024"])
    assert resume_changes(cfg, changed) == ["data.seq_len 32 -> 16", "run.seed 7 -> 8"]
    # a derived default given explicitly is the same setting (fp32 training sums gradients in fp32 anyway)
    assert resume_changes(cfg, load_config(TINY, ["train.grad_accum_dtype=fp32"])) == []
    assert resume_changes(cfg, load_config(TINY, ["train.precision=bf16"])) == ["train.precision fp32 -> bf16"]
