"""Finetune an image classifier with SAM (or the paired plain-SGD baseline) from a YAML recipe.

    accelerate launch --config_file accelerate_configs/multi_gpu.yaml recipes/finetune.py \
        --config recipes/cifar10/efficientnet_b7/sam.yaml [--any_field value]

The YAML's flat keys are defaults, command-line flags override them, and a key or flag that is not a field of
`ScriptArguments`, `ModelArguments`, `DataArguments` or `hf_sam.SAMTrainingArguments` is an error. Check a
recipe on any machine (no data, model or Hub access; a GPU-only setting such as `bf16` is checked as if on
CPU): `python recipes/finetune.py --config <recipe> --check_config true [--num_processes 8]`.

A recipe's `global_batch_size` fixes the examples per optimizer step: `gradient_accumulation_steps` is derived
from the launch's process count (`WORLD_SIZE`), with `per_device_train_batch_size` (SAM's m) kept; a count that
does not divide is refused. Configuration errors (unknown keys, bad values, output_dir conflicts) are reported
before environment errors (bf16 without a bf16 GPU).

Writes into `output_dir`: the model (safetensors + config with label names + preprocessing config; a timm
model in a layout both `transformers` and `timm.create_model` read), `test_results.json` (top-1 / top-5 on
the test split), `train_results.json`, `resolved_config.yaml` and a model card (`README.md`). With
`push_to_hub: true` and `hub_model_id`, the files a user loads (`hf_sam.finetune.hub.PUSHED_FILES`: weights, configs,
card, test results, resolved recipe; no checkpoints, no `training_args.bin`) are uploaded at the end, to a private
repository with `hub_private_repo: true`.

This script is the run's steps; what they use is in `hf_sam`: the arguments and their checks in `hf_sam.finetune.cli`,
resumable checkpoints in `hf_sam.finetune.checkpoints`, the trainer and metric in `hf_sam.finetune.finetuning`, the card in
`hf_sam.finetune.model_card`, the push in `hf_sam.finetune.hub`.
"""

from __future__ import annotations

import glob
import os
import shutil

import yaml
from transformers import set_seed

from hf_sam.batchnorm import freeze_batchnorm
from hf_sam.finetune.checkpoints import CheckpointError, check_checkpoint_fits, resolve_resume
from hf_sam.finetune.cli import (
    ConfigError,
    check_local_paths,
    check_report,
    end_distributed_run,
    exit_on,
    parse_config,
    resolved_config,
)
from hf_sam.finetune.data import (
    AugmentationEpochCallback,
    DataError,
    add_label_noise,
    collate,
    load_image_classification,
    preprocessing_from_processor,
    resolve_spec,
    set_transforms,
)
from hf_sam.finetune.finetuning import RecipeTrainer, top_k_accuracy
from hf_sam.finetune.hub import HubError, create_repo, upload_run
from hf_sam.finetune.model_card import write_model_card
from hf_sam.finetune.models import (
    ModelError,
    architecture,
    has_batchnorm,
    is_timm,
    load_model_and_processor,
    make_timm_loadable,
)

RECIPE_ERRORS = (ConfigError, CheckpointError, DataError, ModelError, HubError)  # one `error:` line each


def main(argv: list[str] | None = None, callbacks: list | None = None) -> dict[str, float]:
    """Run a recipe; recipe, data, model and Hub problems exit with one `error:` line, before any training.
    `callbacks`: extra `TrainerCallback`s (e.g. the demo's progress bar)."""
    with exit_on(ValueError):  # ours and SAMTrainingArguments' (invalid sam_* values, bf16 without GPU, ...)
        args = parse_config(argv)
    if args.script.check_config:
        print(check_report(args))
        return {}
    training = args.training
    with exit_on(RECIPE_ERRORS, output_dir=training.output_dir):  # leaves no empty output_dir behind
        check_local_paths(args)  # a mistyped folder: now, not as "the Hub is unreachable" after loading data
        set_seed(training.seed)
        # We push once, at the end, with the card.
        push_to_hub, training.push_to_hub = training.push_to_hub, False
        if push_to_hub and training.process_index == 0:
            create_repo(training.hub_model_id, training.hub_private_repo)

        # -------------------------------------------------------------- load: data, resumed checkpoint, model
        spec = resolve_spec(
            args.data.dataset, args.data.image_column, args.data.label_column, args.data.train_split,
            args.data.test_split, args.data.dataset_revision, args.data.dataset_config,
        )  # fmt: skip
        with training.main_process_first(desc="loading the dataset"):
            data = load_image_classification(
                spec, args.data.dataset_path, args.data.num_labels, args.data.label_subset,
                args.data.max_train_samples, args.data.max_test_samples, args.data.verify_images,
            )  # fmt: skip
        if args.data.label_noise:
            noise_seed = training.seed if args.data.label_noise_seed is None else args.data.label_noise_seed
            data.train = add_label_noise(
                data.train,
                data.label_column,
                args.data.label_noise,
                noise_seed,
                len(data.label_names),
                args.data.label_noise_type,
            )
        resume = resolve_resume(
            training.resume_from_checkpoint, training.output_dir, not training.save_only_model, warn=True
        )
        model, processor = load_model_and_processor(
            args.model.model_name_or_path, data.label_names, args.model.model_revision, args.model.trust_remote_code,
            drop_rate=args.model.drop_rate, drop_path_rate=args.model.drop_path_rate, head_init=args.model.head_init,
            image_size=args.model.image_size, head_init_seed=args.model.head_init_seed,
            pos_embed_interpolation=args.model.pos_embed_interpolation,
        )  # fmt: skip
        if resume:
            check_checkpoint_fits(model, resume)

        # -------------------------------------------------------------- build: BatchNorm, transforms, trainer
        if args.model.freeze_batchnorm:
            frozen = freeze_batchnorm(model)
            print(
                f"freeze_batchnorm: {frozen} BatchNorm layers use their pretrained statistics for the whole run"
            )
        train_transform = set_transforms(
            data, preprocessing_from_processor(processor), args.data.train_augmentation, training.seed,
            args.data.eval_resize, args.data.crop_min_area,
        )  # fmt: skip
        training.remove_unused_columns = False  # the lazy transform needs the raw image and label columns
        try:
            trainer = RecipeTrainer(
                model=model, args=training, train_dataset=data.train, eval_dataset=data.test,
                data_collator=collate, processing_class=processor, compute_metrics=top_k_accuracy,
                weight_decay_all_parameters=args.script.weight_decay_all_parameters, callbacks=callbacks,
            )  # fmt: skip
        except ValueError as err:  # set-up checks that need the model (a sam_param_filter matching nothing)
            raise ConfigError(str(err)) from None
        if train_transform.seed is not None:
            trainer.add_callback(AugmentationEpochCallback(train_transform))

        # -------------------------------------------------------------- train
        if not resume and args.script.overwrite_output_dir and trainer.is_world_process_zero():
            for old in glob.glob(os.path.join(training.output_dir, "checkpoint-*")):
                shutil.rmtree(old)  # starting over: the old run's checkpoints would be "the last checkpoint"
        train_result = trainer.train(resume_from_checkpoint=resume)
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()

        # -------------------------------------------------------------- evaluate
        metrics = trainer.evaluate(data.test, metric_key_prefix="test")
        trainer.log_metrics("test", metrics)
        trainer.save_metrics("test", metrics)

        # -------------------------------------------------------------- save: model, resolved recipe, card
        trainer.save_model(training.output_dir)
        if trainer.is_world_process_zero():
            make_timm_loadable(training.output_dir)
            with open(os.path.join(training.output_dir, "resolved_config.yaml"), "w") as f:
                yaml.safe_dump(resolved_config(args), f, sort_keys=False)
            engine = trainer.sam_engine  # how the run was distributed, and the scope of its ε
            write_model_card(
                args, spec, data.source, len(data.train), len(data.test), data.label_names, metrics,
                is_timm(model), engine=engine.name, global_epsilon=engine.global_epsilon,
                architecture=architecture(model), batchnorm=has_batchnorm(model),
            )  # fmt: skip

        # -------------------------------------------------------------- push
        if push_to_hub and trainer.is_world_process_zero():
            upload_run(training.output_dir, training.hub_model_id)
        return metrics


if __name__ == "__main__":
    main()
    end_distributed_run()  # a multi-process launch: leave together, tear the group down, exit without finalizers
