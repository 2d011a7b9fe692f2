"""jax_deepep: DeepEP-class expert-parallel dispatch/combine for JAX.

    buffer = jax_deepep.Buffer(mesh, "ep")
    # inside jax.shard_map over "ep":
    out = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=w, num_experts=E)
    y, _ = buffer.combine(expert_out, out.handle)
"""
from . import fp8, reference
from .buffer import Buffer
from .build_info import build_info
from .checking import checked
from .config import Config
from .gpu import available as cuda_available
from .types import (DispatchHandle, DispatchLayout, DispatchOutput, ExpertGroupedHandle, LowLatencyDispatchOutput,
                    LowLatencyHandle, PendingLowLatencyCombine)
from .trace_names import CHECKPOINT_NAMES
from .validation import DeepEPError

__version__ = "0.1.0"

__all__ = [
    "Buffer", "CHECKPOINT_NAMES", "Config", "build_info", "DispatchHandle", "DispatchLayout", "DispatchOutput",
    "ExpertGroupedHandle", "LowLatencyDispatchOutput", "LowLatencyHandle", "PendingLowLatencyCombine", "DeepEPError",
    "checked", "cuda_available", "fp8", "reference",
]
