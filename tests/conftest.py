import os
import sys

# Tests never reach the Hub (the machine is offline, CI too): fail fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `from toy import ...` in the tests and in the subprocess scripts.
sys.path.insert(0, os.path.dirname(__file__))
