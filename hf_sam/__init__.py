"""hf-sam: Sharpness-Aware Minimization for the Hugging Face Trainer."""

from hf_sam.callbacks import SharpnessCallback
from hf_sam.configs import SAMArguments, SAMTrainingArguments
from hf_sam.sam import SAM
from hf_sam.trainer import SAMMixin, SAMTrainer

__version__ = "0.1.0"
__all__ = [
    "SAM",
    "SAMArguments",
    "SAMMixin",
    "SAMTrainer",
    "SAMTrainingArguments",
    "SharpnessCallback",
    "__version__",
]
