"""What the CUDA kernels can serve: the limits every backend enforces alike (docs/API.md)."""

MAX_TOPK = 32  # top-k columns the kernels keep per token (shared-memory tables of 32)
# Expert ids, counts and row indices are int32 everywhere (JAX's default integers, the kernels' ints).
MAX_INT32 = 2**31 - 1
FP8_BLOCK = 128  # channels per FP8 scale
# Counts are rounded up in int32 on the GPU: a larger alignment could wrap (2**32 even divides by zero).
MAX_EXPERT_ALIGNMENT = 1 << 16
# Low latency: each expert's slot table of M tokens lives in shared memory, and a count travels in the
# low 16 bits of a signal (xla_ffi/low_latency_ffi.cc kMaxTokensPerRank).
LOW_LATENCY_MAX_TOKENS_PER_RANK = 8192
# The kernels move bf16 rows in 16-byte pieces of 8 channels.
ROW_CHANNELS = 8
# Low latency with use_logfmt: the combine receive keeps each (top-k row, 128-channel group)'s decoding
# parameters in shared memory, 12 bytes each (cuda/low_latency.cu).
LOGFMT_MAX_DECODED_GROUPS = 3072
