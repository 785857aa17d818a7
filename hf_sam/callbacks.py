"""`SharpnessCallback`: log λmax and m-sharpness during `Trainer` training, to every `report_to` backend."""

from __future__ import annotations

import random
import time
from contextlib import contextmanager

import numpy as np
import torch
from transformers import Trainer, TrainerCallback
from transformers.utils import logging

from hf_sam.hessian import hessian_eigenvalues
from hf_sam.m_sharpness import m_sharpness
from hf_sam.measurement import LossFn, check_attention, model_loss

logger = logging.get_logger(__name__)


class SharpnessCallback(TrainerCallback):
    """Measure the sharpness of the current weights every `every_n_steps` optimizer steps and at the end of
    training, on a fixed slice of the training set, and log it through `trainer.log` (so `report_to` backends,
    `trainer.state.log_history` and the progress bar all get it)::

        trainer = SAMTrainer(model=model, args=args, train_dataset=train, data_collator=collator)
        trainer.add_callback(SharpnessCallback(trainer, every_n_steps=200, num_examples=512, top_k=5))
        trainer.train()

    Logged keys: `sharpness/lambda_max` (top Hessian eigenvalue, Lanczos), `sharpness/m_sharpness` (mean over
    chunks of `m` examples of max_{‖ε‖₂≤ρ} L(w+ε) − L(w)), `sharpness/loss` (the loss on the slice), and with
    `top_k > 1` also `sharpness/lambda_<k>` and `sharpness/lambda_max_over_lambda_<k>` (the paper reports k = 5).
    See `hf_sam.sharpness` for the methods; every module is in eval mode while measuring (BatchNorm on its
    running statistics, no dropout), and the weights, modes, `.grad`, BatchNorm buffers and random number
    generators are left exactly as they were, so the training run is the same with or without this callback.

    The slice: `num_examples` examples of the training dataset drawn once (seeded by `seed`) when training starts,
    collated with the training collator in batches of `batch_size` (default: `per_device_train_batch_size`) and
    kept in memory, so every measurement sees the same data. Pass `dataset` (and `collate_fn`) to measure on
    other data. `m` defaults to the batch size (SAM's own per-batch sharpness), `rho` to `args.sam_rho` (0.05
    when SAM is off). Cost per measurement: `max_iter` Hessian-vector products (each ≈ 2-3 backward passes over
    the slice) plus `ascent_steps` + 1 passes for m-sharpness. The trainer is needed to log (like TRL's logging
    callbacks); measuring runs on the main process only (single process or DDP; not DeepSpeed or FSDP).
    """

    def __init__(
        self,
        trainer: Trainer,
        *,
        every_n_steps: int = 500,
        num_examples: int = 256,
        batch_size: int | None = None,
        m: int | None = None,
        rho: float | None = None,
        ascent_steps: int = 1,
        top_k: int = 1,
        max_iter: int = 20,
        loss_fn: LossFn = model_loss,
        dataset=None,
        collate_fn=None,
        seed: int = 0,
    ) -> None:
        if not isinstance(trainer, Trainer):
            raise TypeError(
                "SharpnessCallback logs through the trainer: build the trainer first, then "
                f"trainer.add_callback(SharpnessCallback(trainer, ...)); got {type(trainer).__name__}."
            )
        for name, value in (
            ("every_n_steps", every_n_steps),
            ("num_examples", num_examples),
            ("top_k", top_k),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
            raise ValueError(
                "SharpnessCallback needs the full weights on one process: not DeepSpeed or FSDP."
            )
        if trainer.model is not None:
            check_attention(trainer.model)  # refused now, not hours into the run at the first measurement
        self.trainer = trainer
        self.every_n_steps = every_n_steps
        self.num_examples = num_examples
        self.batch_size = batch_size or trainer.args.per_device_train_batch_size
        self.m = m or self.batch_size
        sam_rho = getattr(trainer.args, "sam_rho", 0.0)
        self.rho = rho if rho is not None else (sam_rho if sam_rho > 0 else 0.05)
        self.ascent_steps = ascent_steps
        self.top_k = top_k
        self.max_iter = max(max_iter, top_k)
        self.loss_fn = loss_fn
        self.dataset = dataset
        self.collate_fn = collate_fn
        self.seed = seed
        self._batches: list | None = None
        self._last_measured_step: int | None = None

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        if self._batches is None:
            dataset = self.dataset if self.dataset is not None else getattr(train_dataloader, "dataset", None)
            collate_fn = (
                self.collate_fn or getattr(train_dataloader, "collate_fn", None) or self.trainer.data_collator
            )
            if dataset is None:
                raise ValueError(
                    "SharpnessCallback found no training dataset: pass dataset=... to measure on."
                )
            with _rng_preserved():  # random transforms in the collator must not move the training RNG
                self._batches = self._fixed_batches(dataset, collate_fn)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every_n_steps == 0:
            # trainer.log() runs the on_log event, which clears control.should_log: without putting it back, the
            # Trainer's own loss log due at this very step would be silently skipped.
            should_log = control.should_log
            self._measure(state, model)
            control.should_log = self.trainer.control.should_log = should_log
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self._last_measured_step != state.global_step:
            self._measure(state, model)

    # ------------------------------------------------------------------ work
    def _fixed_batches(self, dataset, collate_fn) -> list:
        if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
            generator = torch.Generator().manual_seed(self.seed)
            picked = (
                torch.randperm(len(dataset), generator=generator)[: self.num_examples].sort().values.tolist()
            )
            examples = [dataset[i] for i in picked]
        else:  # an iterable dataset: its first examples
            examples = [example for _, example in zip(range(self.num_examples), dataset)]
        if len(examples) < self.m:
            raise ValueError(
                f"SharpnessCallback: the slice has {len(examples)} examples, fewer than m={self.m}; "
                "lower m or raise num_examples."
            )
        return [
            collate_fn(examples[i : i + self.batch_size]) for i in range(0, len(examples), self.batch_size)
        ]

    def _measure(self, state, model) -> None:
        """One measurement; a failure is logged and training goes on (a diagnostic never ends a run)."""
        self._last_measured_step = state.global_step
        if not state.is_world_process_zero:
            return
        model = model if model is not None else self.trainer.model
        try:
            self._measure_and_log(state, model)
        except (RuntimeError, ValueError) as error:
            logger.warning(
                f"SharpnessCallback: the measurement at step {state.global_step} failed and was skipped; training "
                f"goes on. {type(error).__name__}: {error}"
            )

    def _measure_and_log(self, state, model) -> None:
        start = time.perf_counter()
        spectrum = hessian_eigenvalues(
            model,
            self._batches,
            top_k=self.top_k,
            loss_fn=self.loss_fn,
            max_iter=self.max_iter,
            seed=self.seed,
        )
        sharpness = m_sharpness(
            model, self._batches, m=self.m, rho=self.rho, ascent_steps=self.ascent_steps, loss_fn=self.loss_fn
        )
        logs = {
            "sharpness/lambda_max": spectrum.lambda_max,
            "sharpness/m_sharpness": sharpness.value,
            "sharpness/loss": sharpness.loss,
        }
        if self.top_k > 1:
            logs[f"sharpness/lambda_{self.top_k}"] = spectrum.eigenvalues[-1]
            logs[f"sharpness/lambda_max_over_lambda_{self.top_k}"] = spectrum.ratio
        logger.info(f"Sharpness at step {state.global_step} measured in {time.perf_counter() - start:.1f}s")
        self.trainer.log(logs)


@contextmanager
def _rng_preserved():
    """Python, NumPy and torch (CPU and CUDA) random states put back as they were."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
