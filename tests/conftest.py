"""Shared test set-up.

Training compiles the PPO family's actor loss by default (``--compile``). Compiling takes
seconds per distinct batch shape, and the tests train dozens of tiny runs of different
shapes, so the suite runs the plain (eager) path: PyTorch's own switch,
``TORCH_COMPILE_DISABLE=1``, makes ``torch.compile`` a no-op, here and in every subprocess a
test starts. tests/test_compile.py turns compiling back on to check it against the plain path.
"""
import os

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import torch._dynamo.config  # noqa: E402  (in case torch was imported before this file)

torch._dynamo.config.disable = os.environ["TORCH_COMPILE_DISABLE"] == "1"
