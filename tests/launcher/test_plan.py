"""`launcher/plan.py`: the memory plan agrees with what DeepSpeed allocates (measured on CPU) and with DeepSpeed's
own estimators; --gpu-memory parsing; the GPU cluster presets."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import sys

import pytest
import torch
import torch.nn.functional as F

from helpers import REPO, TINY, zerotrain
from launcher.plan import deepspeed_estimate, flops_per_token, parse_memory, plan
from live_tensors import NewStorages, kept_for_backward
from ranks import spawn, write_result
from trainer.config import ConfigError, load_config
from trainer.memory import OPTIONS, GiB, Option, activation_bytes, architecture, estimate, recommend

VOCAB = 8192
# a 7.1M-parameter Llama with GQA: DeepSpeed builds it in a second, yet every ZeRO structure is there
SMALL = ["model.config.hidden_size=256", "model.config.intermediate_size=688", "model.config.num_hidden_layers=4",
         "model.config.num_attention_heads=4", "model.config.num_key_value_heads=2", "train.micro_batch_size=2"]
TOLERANCE = 0.15  # measured live model-state bytes vs the estimate


VARIANTS = {
    "": [],
    # adapters of rank 64 on every linear layer of the blocks (1.2M parameters trained, 7.1M frozen)
    "lora": ["model.lora.rank=64"],
    # a Mixtral of 4 experts per layer (8.5M of its 11.2M parameters), each of 2 ranks holding 2 (AutoEP)
    "moe": ["model.type=mixtral", "model.config.num_local_experts=4", "parallel.expert=2"],
}


def small_config(stage: int, precision: str, world: int, variant: str = ""):
    return load_config(TINY, SMALL + [f"zero.stage={stage}", f"train.precision={precision}",
                                      f"launch.nproc_per_node={world}", f"train.global_batch_size={2 * world}"]
                       + VARIANTS[variant])


# ---------------------------------------------------------------------------------------------------------------
# measured: live tensor bytes of DeepSpeed's engine on CPU


def peak_model_states(cfg) -> int:
    """The most new bytes in the second training step (the first made the Adam moments): after backward, at the
    optimizer step (DeepSpeed's fp32 gradients exist only then), after the step."""
    import deepspeed
    from transformers import AutoModelForCausalLM

    from trainer.engine.deepspeed_config import deepspeed_config
    from trainer.engine.repairs import output_recorders_by_class_name
    from trainer.model.build import build_model, model_config
    from trainer.model.lora import add_adapters
    from trainer.optim import param_groups
    from trainer.tasks.causal_lm import lm_loss

    torch.manual_seed(0)
    storages = NewStorages()
    model = build_model(cfg.model, model_config(cfg.model, VOCAB), AutoModelForCausalLM)
    if cfg.model.lora:
        model = add_adapters(model, cfg.model.lora, cfg.model.task, 0)
    if cfg.parallel.expert > 1:
        output_recorders_by_class_name()
    ds_config = deepspeed_config(cfg, sum(p.numel() for p in model.parameters()),
                                 trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
                                 model_type=model.config.model_type)
    groups = param_groups(model, cfg.optim.weight_decay, named=cfg.parallel.expert > 1)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups,
                                      config=ds_config)
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the torch AdamW DeepSpeed steps
    batch = torch.randint(0, VOCAB, (cfg.train.micro_batch_size, cfg.data.seq_len + 1))
    engine.backward(lm_loss(engine, batch))
    engine.step()
    seen = []
    inner.register_step_pre_hook(lambda *_: seen.append(storages.bytes()))
    engine.backward(lm_loss(engine, batch))
    seen.append(storages.bytes())
    engine.step()
    return max(seen + [storages.bytes()])


def measure_rank(rank: int, world: int, port: int, combos: list, out: str) -> None:
    """One rank (spawned process) measuring each (stage, precision) in turn."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist

    # DeepSpeed's JIT-compiled shared-memory all-reduce changes no allocation; skipping it saves its (re)build
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    results = {f"{stage}-{precision}-{variant}": peak_model_states(small_config(stage, precision, world, variant))
               for stage, precision, variant in combos}
    write_result(out, rank, results)
    dist.barrier()
    dist.destroy_process_group()


def measured(world: int, combos: list) -> dict:
    return spawn(measure_rank, world, combos)[0]


def estimated(key: str, world: int) -> int:
    """The plan's peak without activations and backward-only buffers (gradient buckets, stage-3 gathered layers),
    which are gone at the points measured: model states, resident buffers, the optimizer step's fp32 gradients.
    `key`: stage-precision-variant."""
    stage, precision, variant = key.split("-")
    stage = int(stage)
    cfg = small_config(stage, precision, world, variant)
    est = estimate(cfg, architecture(cfg, VOCAB), Option(stage), 1, world)
    return est.states + est.resident + max(est.step, 0)


def check(results: dict, world: int) -> None:
    ratios = {key: results[key] / estimated(key, world) for key in results}
    print(f"measured / estimated, {world} rank(s):", {k: round(r, 3) for k, r in ratios.items()})
    for key, ratio in ratios.items():
        assert abs(ratio - 1) <= TOLERANCE, f"ZeRO-{key}: measured / estimated = {ratio:.3f}"


def test_model_states_match_deepspeed_on_one_process():
    combos = [(stage, precision, "") for stage in (0, 1, 2, 3) for precision in ("bf16", "fp32")]
    check(measured(1, combos), 1)


@pytest.mark.slow
def test_model_states_match_deepspeed_partitioned_over_two_ranks():
    """With LoRA too (stage 1: its fp32 gradient copies; stage 3: partitioned): the frozen base in 16-bit weights
    only, the adapters' full states. And a mixture of experts split over the 2 ranks (parallel.expert): each
    holds half the experts, whose states ZeRO cannot partition further (each is held by one rank only)."""
    check(measured(2, [(0, "bf16", ""), (1, "bf16", ""), (2, "bf16", ""), (2, "fp32", ""), (3, "bf16", ""),
                       (1, "bf16", "lora"), (3, "bf16", "lora"), (1, "bf16", "moe"), (3, "bf16", "moe")]), 2)


# ---------------------------------------------------------------------------------------------------------------
# activations: the bytes autograd keeps for backward, plus the logits around the loss


@pytest.mark.parametrize("dtype,attention", [(torch.bfloat16, "sdpa"), (torch.float32, "sdpa"),
                                             (torch.bfloat16, "eager")])
def test_activation_estimate_matches_saved_tensors(dtype, attention):
    from transformers import AutoModelForCausalLM

    from trainer.model.build import model_config

    cfg = load_config(TINY, SMALL + ["data.seq_len=128"])
    model = AutoModelForCausalLM.from_config(model_config(cfg.model, VOCAB), attn_implementation=attention).to(dtype)
    batch = torch.randint(0, VOCAB, (2, 129))

    def forward_and_loss():
        as_fp32 = model(input_ids=batch[:, :-1]).logits.float()  # what lm_loss does: both alive around the loss
        F.cross_entropy(as_fp32.flatten(0, 1), batch[:, 1:].flatten())
        return [as_fp32]

    kept = kept_for_backward(model, forward_and_loss)
    arch = dataclasses.replace(architecture(cfg, VOCAB), attention=attention)
    precision = "bf16" if dtype == torch.bfloat16 else "fp32"
    ratio = kept / activation_bytes(arch, precision, 2, 128)
    print(f"activations {precision} {attention}: measured / estimated {ratio:.3f}")
    assert abs(ratio - 1) <= TOLERANCE, f"{precision} {attention}: measured / estimated activations = {ratio:.3f}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_chunked_loss_keeps_only_the_models_logits(dtype):
    """train.loss_chunk_tokens: the fp32 copy of the logits and its log-softmax are recomputed chunk by chunk in
    backward, not kept; the plan counts what is."""
    from transformers import AutoModelForCausalLM

    from trainer.model.build import model_config
    from trainer.tasks.causal_lm import lm_loss

    cfg = load_config(TINY, SMALL + ["data.seq_len=128"])
    model = AutoModelForCausalLM.from_config(model_config(cfg.model, VOCAB)).to(dtype)
    batch = torch.randint(0, VOCAB, (2, 129))
    kept = kept_for_backward(model, lambda: [lm_loss(model, batch, chunk=37)])
    precision = "bf16" if dtype == torch.bfloat16 else "fp32"
    whole, chunked = (activation_bytes(architecture(cfg, VOCAB), precision, 2, 128, chunked_loss=c)
                      for c in (False, True))
    print(f"activations {precision}, chunked loss: measured / estimated {kept / chunked:.3f} "
          f"(estimate whole / chunked {whole / chunked:.2f})")
    assert abs(kept / chunked - 1) <= TOLERANCE


# ---------------------------------------------------------------------------------------------------------------
# big models: DeepSpeed's estimators


def deepspeed_printed(arch, nodes: int, gpus: int) -> dict[tuple, float]:
    """GPU GiB per (stage, offload_optimizer, offload_param) as `estimate_zero{2,3}_model_states_mem_needs_all_cold`
    print them (zero_init=0 rows: zerotrain builds the whole model on every rank)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    printed = {}
    for stage in (2, 3):
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            if stage == 2:
                estimate_zero2_model_states_mem_needs_all_cold(total_params=arch.params, num_gpus_per_node=gpus,
                                                               num_nodes=nodes)
            else:
                estimate_zero3_model_states_mem_needs_all_cold(total_params=arch.params,
                                                               largest_layer_params=arch.largest_layer,
                                                               num_gpus_per_node=gpus, num_nodes=nodes)
        # rows like "   89.41GB |   1.86GB | offload_param=none, offload_optimizer=OffloadDeviceEnum.cpu, zero_init=0"
        for gib, options in re.findall(r"\|\s*([\d.]+)GB \|\s*(.+)", text.getvalue()):
            option = dict(re.findall(r"(\w+)=(\S+?)(?:,|\s|$)", options))
            if option.get("zero_init", "0") == "0":
                key = (stage, "cpu" in option["offload_optimizer"], "cpu" in option.get("offload_param", "none"))
                printed[key] = float(gib)
    return printed


@pytest.mark.parametrize("name,nodes", [("llama_7b", 2), ("llama_70b", 16)])
def test_stage_2_and_3_agree_with_deepspeed_estimators(name, nodes):
    """Stage 2: exactly DeepSpeed's 2 + 18/N B/param (its 18 includes the fp32 gradient copy of the step).
    Stage 3: DeepSpeed's 18/N + 4 B x the largest layer; we count the gathered layers as buffers and add the 16-bit
    gradient partition DeepSpeed keeps but its estimator leaves out, so ours is 20/18 = 1.11 x its states. Its
    estimators count gradients summed in 16 bits: so does the config compared."""
    cfg = load_config(REPO / "configs" / f"{name}.yaml", ["train.grad_accum_dtype=bf16"], cuda_available=True)
    arch = architecture(cfg)
    printed = deepspeed_printed(arch, nodes, 8)
    expected = {Option(2): 1.0, Option(2, True): 1.0, Option(3): 20 / 18, Option(3, True): 1.0,
                Option(3, True, True): 1.0}
    for option, ratio in expected.items():
        gpu, largest = deepspeed_estimate(arch, option, nodes, 8)
        key = (option.stage, option.offload_optimizer, option.offload_param)
        assert printed[key] == pytest.approx(gpu / GiB, abs=0.01), key  # the numbers the named functions print
        est = estimate(cfg, arch, option, nodes, 8)
        ours = est.states + max(est.step, 0)
        assert ours == pytest.approx(ratio * (gpu - largest), rel=0.01, abs=0.01 * GiB), option


# ---------------------------------------------------------------------------------------------------------------
# the GPU presets and the report


@pytest.mark.parametrize("name,size", [("llama_1b", 1e9), ("llama_7b", 7e9), ("llama_70b", 70e9),
                                       ("llama_8b_32k", 8e9)])
def test_gpu_presets_load_and_follow_the_plan(name, size):
    cfg = load_config(REPO / "configs" / f"{name}.yaml", cuda_available=True)
    arch = architecture(cfg)
    assert abs(arch.params / size - 1) <= 0.10, arch.params
    assert cfg.train.precision == "bf16" and cfg.launch.nproc_per_node == 8
    nodes = cfg.launch.nnodes
    estimates = [estimate(cfg, arch, option, nodes, 8) for option in OPTIONS]
    chosen, checkpointing = recommend(estimates, 80 * 0.9 * GiB)
    assert (chosen.option.stage, chosen.option.offload_optimizer) == (cfg.zero.stage, False)
    assert checkpointing == (name == "llama_70b")  # 70B: one 4096-token sequence's activations exceed 80 GB
    # 32k tokens: a sequence's activations (213 GiB) fit only split over a node's 8 GPUs (26.6 GiB each)
    assert (cfg.parallel.sequence == 8) == (name == "llama_8b_32k")
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    assert 1e6 <= tokens <= 4.5e6


@pytest.mark.parametrize("name,total,active", [("qwen3_30b_a3b", 30.5e9, 3.3e9), ("mixtral_8x7b", 46.7e9, 12.9e9)])
def test_mixture_of_experts_presets_follow_the_plan_on_one_and_sixteen_h200_nodes(name, total, active):
    """The published totals and active parameters per token; expert parallelism over a node's 8 GPUs; the stage
    the plan recommends for 8 and 128 H200s (141 GB) as the preset's comment says."""
    cfg = load_config(REPO / "configs" / f"{name}.yaml", cuda_available=True)
    arch = architecture(cfg)
    assert arch.params == pytest.approx(total, rel=0.01)
    assert arch.params - arch.idle_experts == pytest.approx(active, rel=0.02)
    assert cfg.parallel.expert == cfg.launch.nproc_per_node == 8
    chosen = {nodes: recommend([estimate(cfg, arch, option, nodes, 8) for option in OPTIONS], 141 * 0.9 * GiB)
              for nodes in (1, 16)}
    assert {nodes: (est.option, checkpointing) for nodes, (est, checkpointing) in chosen.items()} == {
        1: (Option(1, offload_optimizer=name == "mixtral_8x7b"), False), 16: (Option(1), False)}
    assert Option(cfg.zero.stage, cfg.zero.offload_optimizer != "none") == chosen[cfg.launch.nnodes][0].option


def test_report_for_7b_on_two_nodes():
    report = plan(load_config(REPO / "configs" / "llama_7b.yaml", cuda_available=True), 2, 8, 80)
    assert "6,738,415,616 parameters" in report and "gradient accumulation 32" in report
    assert re.search(r"^ZeRO-0 .* no +\|", report, re.M) and re.search(r"^ZeRO-2 .* yes +\|", report, re.M)
    assert "recommended: ZeRO-2 " in report and "TOO BIG" not in report


def test_report_flags_what_70b_lacks():
    report = plan(load_config(REPO / "configs" / "llama_70b.yaml", cuda_available=True), 16, 8, 80)
    assert "only with activation checkpointing" in report and "each rank builds only its partition" in report
    assert "recommended: ZeRO-3 " in report
    # the smallest degree within a node that needs neither checkpointing nor offload: tensor 2/4 and sequence 2 do not
    assert "or parallel.sequence: 4 (within a node): ZeRO-3 fits without offload or checkpointing" in report


def test_a_tensor_parallel_plan_counts_a_ranks_slice():
    cfg = load_config(REPO / "configs" / "llama_70b.yaml", ["zero.stage=2", "parallel.tensor=8",
                                                             "model.gradient_checkpointing=true"], cuda_available=True)
    arch = architecture(cfg)
    report = plan(cfg, 16, 8, 80)
    assert "a rank of a tensor group of 8 holds 8.85B" in report and not re.search("^ZeRO-3", report, re.M)
    assert "recommended: ZeRO-2 " in report and "or parallel." not in report  # already split
    whole = estimate(cfg.model_copy(update={"parallel": cfg.parallel.model_copy(update={"tensor": 1})}), arch,
                     Option(2), 16, 8)
    split = estimate(cfg, arch, Option(2), 16, 8)
    assert split.params == 2 * arch.held(8) and arch.held(8) < arch.params / 7  # bf16 weights of the slice
    assert split.activations < whole.activations / 2


def test_flops_count_the_multiplying_parameters():
    cfg = load_config(REPO / "configs" / "llama_7b.yaml", cuda_available=True)
    arch = architecture(cfg)
    assert arch.multiplying == arch.params - arch.embedding  # untied: the input embedding is a lookup
    assert flops_per_token(arch, 4096) == 6 * arch.multiplying + 12 * 32 * 4096 * 4096
    tied = architecture(load_config(REPO / "configs" / "llama_1b.yaml", cuda_available=True))
    assert tied.lm_head == 0 and tied.multiplying == tied.params


def test_vocabulary_comes_from_init_from_or_the_tokenizer(tmp_path):
    from transformers import AutoConfig

    AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, vocab_size=1000).save_pretrained(tmp_path / "model")
    cfg = load_config(TINY, ["model.config={}", f"model.init_from={tmp_path / 'model'}"])
    assert architecture(cfg).vocab == 1000
    with pytest.raises(ConfigError, match=r"^tokenizer.path: .*no such tokenizer folder"):
        architecture(load_config(TINY, [f"tokenizer.path={tmp_path / 'missing'}"]))


def test_a_sequence_degree_that_does_not_divide_the_gpus_is_refused():
    cfg = load_config(REPO / "configs" / "llama_8b_32k.yaml", cuda_available=True)
    with pytest.raises(ConfigError, match="^parallel.sequence: 8 does not divide the 6 GPUs of --nodes x --gpus"):
        plan(cfg, 1, 6, 80)


def test_the_plan_checks_the_cluster_it_is_asked_about_not_the_configs_launch_section():
    """configs/tiny.yaml launches 2 ranks; a plan for 2 nodes x 2 GPUs with tensor degree 2 is valid there."""
    result = zerotrain("plan", TINY, "--nodes", "2", "--gpus-per-node", "2", "--set", "parallel.tensor=2",
                       "--set", "train.global_batch_size=8")
    assert "4 ranks" in result.stdout and "a rank of a tensor group of 2 holds" in result.stdout
    refused = zerotrain("plan", TINY, "--nodes", "1", "--gpus-per-node", "3", "--set", "parallel.tensor=2",
                        check=False)
    assert refused.returncode == 2 and "parallel.tensor: 2 does not divide the world size (3)" in refused.stderr


# ---------------------------------------------------------------------------------------------------------------
# --gpu-memory


@pytest.mark.parametrize("text,gib", [("80GB", 80), ("80GiB", 80), ("141G", 141), ("80", 80), ("80 gb", 80),
                                      (" 40GiB ", 40), ("0.5T", 512), ("512MiB", 0.5), ("94.5GB", 94.5)])
def test_parse_memory_accepts(text, gib):
    assert parse_memory(text) == gib


@pytest.mark.parametrize("text,message", [
    ("", "expected a size such as 80GB"), ("GB", "expected a size"), ("80GBs", "expected a size"),
    ("eighty", "expected a size"), ("-80GB", "expected a size"), ("80PB", "expected a size"),
    ("80b", "expected a size"), ("nan", "expected a size"), ("0GB", "must be more than 0"),
])
def test_parse_memory_refuses_with_one_line(text, message):
    with pytest.raises(ConfigError) as e:
        parse_memory(text)
    assert str(e.value).startswith("--gpu-memory: ") and message in str(e.value) and "\n" not in str(e.value)
