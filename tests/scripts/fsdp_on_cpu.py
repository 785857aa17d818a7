"""Let Accelerate's FSDP plugin run on CPU (gloo) for the two-process tests, then run a script.

Accelerate turns an FSDP plugin on only for accelerator devices: on a CPU-only machine its state says MULTI_CPU
and the plugin (from `args.fsdp` or from `accelerate launch --config_file accelerate_configs/fsdp.yaml`) is
ignored. FSDP2 itself (`fully_shard`) runs on CPU with gloo. So, once the process group is up and just before
the Trainer builds its Accelerator, the shared state is relabelled as a multi-device one; Accelerate then shards
the model exactly as on GPUs. Nothing else is changed.

    python fsdp_on_cpu.py SCRIPT [ARGS...]    # e.g. under accelerate launch: runs SCRIPT as __main__
"""

import runpy
import sys

from accelerate import PartialState
from accelerate.utils import DistributedType
from transformers import Trainer


def enable_fsdp_on_cpu() -> None:
    build = Trainer.create_accelerator_and_postprocess

    def relabelled(self, *args, **kwargs):
        _ = self.args.device  # initialises the gloo process group and Accelerate's shared state
        if PartialState().distributed_type == DistributedType.MULTI_CPU:
            PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
        return build(self, *args, **kwargs)

    Trainer.create_accelerator_and_postprocess = relabelled


if __name__ == "__main__":
    enable_fsdp_on_cpu()
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
