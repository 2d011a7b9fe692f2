"""Repository rule: where the local CUDA compiler is. Writes `defs.bzl` with `NVCC`, the absolute path of
nvcc, or None when there is none (then the CUDA library is not built and the tests use pure JAX).

Looked for in order: $CUDA_PATH/bin, $CUDA_HOME/bin, PATH, /usr/local/cuda/bin."""

def _find_nvcc(repository_ctx):
    env = repository_ctx.os.environ
    for root in [env.get("CUDA_PATH"), env.get("CUDA_HOME")]:
        if root and repository_ctx.path(root + "/bin/nvcc").exists:
            return root + "/bin/nvcc"
    on_path = repository_ctx.which("nvcc")
    if on_path:
        return str(on_path)
    if repository_ctx.path("/usr/local/cuda/bin/nvcc").exists:
        return "/usr/local/cuda/bin/nvcc"
    return None

def _local_cuda_impl(repository_ctx):
    nvcc = _find_nvcc(repository_ctx)
    repository_ctx.file("BUILD.bazel", "")
    repository_ctx.file("defs.bzl", "NVCC = {}\n".format(repr(nvcc)))

local_cuda = repository_rule(
    implementation = _local_cuda_impl,
    environ = ["CUDA_PATH", "CUDA_HOME", "PATH"],
    local = True,
)
