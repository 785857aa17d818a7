"""The recipe application: what `recipes/finetune.py` runs on top of the library (`hf_sam.SAMTrainer`).

`cli` (the recipe's arguments and their checks), `data` (dataset specs, loading and the released pipelines),
`models` (checkpoint loading and the new head), `checkpoints` (resumable checkpoints), `finetuning` (the recipe's
trainer and metric), `model_card` and `hub` (the card and the push). Nothing in the library imports from here.
"""
