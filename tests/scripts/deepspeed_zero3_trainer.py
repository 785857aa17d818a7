r"""Run by tests/test_deepspeed_zero3.py under `torchrun --nproc_per_node 2` (gloo on CPU): `SAMTrainer` under
DeepSpeed ZeRO-3 (DeepSpeed's CPU accelerator), two steps of two accumulated micro-batches each.

Each rank saves its micro-batches, the ascent norms, the gathered weights and its own partitions after every step,
and what SAM allocated. Runs: "persistent" (ZeRO-3's defaults: parameters this small stay gathered between forwards,
as "persistent" parameters), "partitioned" (`stage3_param_persistence_threshold: 0`: every parameter is gathered
for each forward and released after it, the path of a large model), "resumed" (from partitioned's checkpoint-1),
"stock" (the stock Trainer at ρ = 0) and "rho0" (SAMTrainer at ρ = 0), "variants" (one micro-batch per step, three
steps, sam_interval=2, cosine LR and ρ following it), "adaptive" (ASAM: ε = ρ·T²g/‖Tg‖ with T = |w| + η, taken
partition by partition), "bf16" (DeepSpeed's bf16: bf16 working weights, fp32 master
weights), "refused" (a per-process ε, refused at construction) and "sft" (trl's SFTTrainer with SAMMixin).
"""

import os
import sys

import torch
from transformers import Trainer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from scripts.recording import save_record, toy_arguments, toy_trainer  # noqa: E402

from hf_sam.finetune.cli import end_distributed_run  # noqa: E402


def deepspeed_config(**zero) -> dict:
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {"stage": 3, **zero},
        "bf16": {"enabled": "auto"},
    }


PARTITIONED = {"stage3_param_persistence_threshold": 0}


def run(out_dir: str, name: str, zero: dict, resume_from=None, trainer_class=None, **overrides) -> None:
    args = toy_arguments(os.path.join(out_dir, name), deepspeed=deepspeed_config(**zero), **overrides)
    trainer = toy_trainer(args, trainer_class) if trainer_class else toy_trainer(args)
    accumulated = []
    engine_class = type(getattr(trainer, "sam_engine", None)).__name__
    if args.sam_rho > 0:
        engine = trainer.sam_engine
        ascent = engine.ascent_gradient

        def measured(*a, **k):  # the gradient partitions set aside for each ascent (None at a window's start)
            out = ascent(*a, **k)
            accumulated.append(sum(t.numel() for t in engine._accumulated) if engine._accumulated else 0)
            return out

        engine.ascent_gradient = measured
    trainer.train(resume_from_checkpoint=resume_from)
    module = trainer.model_wrapped.module
    trainer.record.update(
        engine=(
            type(trainer.model_wrapped).__name__,
            trainer.model_wrapped.zero_optimization_stage(),
            engine_class,
        ),
        partition_numel=sum(p.ds_tensor.numel() for p in module.parameters()),
        persistent=[bool(p.ds_persist) for p in module.parameters()],
        accumulated_numel=accumulated,
        name=getattr(trainer.sam_engine, "name", None) if hasattr(trainer, "sam_engine") else None,
    )
    save_record(trainer)


def refused(out_dir: str) -> None:
    try:
        toy_trainer(toy_arguments(os.path.join(out_dir, "refused"), deepspeed=deepspeed_config(),
                                  sam_sync_perturbation=False))  # fmt: skip
    except ValueError as error:
        message = str(error)
    else:
        raise AssertionError("sam_sync_perturbation=False was accepted under ZeRO-3")
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(out_dir, "refused.txt"), "w") as f:
            f.write(message)


def sft(out_dir: str) -> None:
    """trl's SFTTrainer with SAMMixin (tests/test_mixin.py's classes and data), two steps of one micro-batch of two
    rows per process: its global micro-batch is the hand reference's batch of four."""
    import deepspeed
    from test_mixin import LR, RHO, SAMSFTConfig, SAMSFTTrainer, prompt_completion_rows, tiny_llama, tokenizer

    model = tiny_llama()
    args = SAMSFTConfig(
        output_dir=os.path.join(out_dir, "sft"), per_device_train_batch_size=2, max_steps=2, learning_rate=LR,
        optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, disable_tqdm=True, train_sampling_strategy="sequential", seed=0, bf16=False,
        sam_rho=RHO, deepspeed=deepspeed_config(**PARTITIONED),
    )  # fmt: skip
    trainer = SAMSFTTrainer(
        model=model, args=args, train_dataset=prompt_completion_rows(), processing_class=tokenizer()
    )
    trainer.train()
    params = list(model.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params]):
        weights = {n: p.detach().clone() for n, p in params}
    if torch.distributed.get_rank() == 0:
        torch.save(
            {"weights": weights, "engine": trainer.sam_engine.name, "log_history": trainer.state.log_history},
            os.path.join(out_dir, "sft.pt"),
        )


def main(out_dir: str) -> None:
    run(out_dir, "persistent", {})
    run(out_dir, "partitioned", PARTITIONED)
    run(out_dir, "resumed", PARTITIONED, resume_from=os.path.join(out_dir, "partitioned", "checkpoint-1"))
    run(out_dir, "stock", PARTITIONED, trainer_class=Trainer, sam_rho=0.0, save_strategy="no")
    run(out_dir, "rho0", PARTITIONED, sam_rho=0.0, save_strategy="no")
    run(
        out_dir,
        "variants",
        PARTITIONED,
        max_steps=3,
        gradient_accumulation_steps=1,
        per_device_train_batch_size=4,
        sam_interval=2,
        lr_scheduler_type="cosine",
        sam_rho_schedule="linear_with_lr",
        sam_rho_min=0.02,
        save_strategy="no",
    )
    run(out_dir, "bf16", PARTITIONED, bf16=True, save_strategy="no")
    run(
        out_dir,
        "adaptive",
        PARTITIONED,
        max_steps=1,
        gradient_accumulation_steps=1,
        per_device_train_batch_size=4,
        sam_adaptive=True,
        sam_eta=0.01,
        save_strategy="no",
    )
    refused(out_dir)
    sft(out_dir)


if __name__ == "__main__":
    main(sys.argv[1])
    end_distributed_run()  # leave together, tear the group down, exit without finalizers
