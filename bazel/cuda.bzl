"""`cuda_shared_library`: a shared library (here: a Python extension module) whose .cu and .cc sources are each compiled by nvcc in an action
of their own (Bazel runs them in parallel and rebuilds only what changed), then linked by nvcc (which
links the CUDA runtime statically, as CMake does)."""

# nvcc names its temporaries $TMPDIR/tmpxft_<pid>_...: actions in PID-namespaced sandboxes share pids,
# so each nvcc gets a fresh temporary directory of its own.
_PRIVATE_TMPDIR = "export TMPDIR=$$(mktemp -d) && trap 'rm -rf \"$$TMPDIR\"' EXIT && "

def _object_path(name, src):
    return "_objs/{}/{}.o".format(name, src)

def cuda_shared_library(
        name,
        nvcc,
        srcs,
        hdrs = [],
        copts = [],
        link_inputs = [],
        linkopts = [],
        relocatable_device_code = False,
        **kwargs):
    """Builds <name>.so.

    Args:
      name: the library is <name>.so (an extension module's name); the target is `name`.
      nvcc: absolute path of the CUDA compiler.
      srcs: .cu and .cc files (nvcc hands .cc files to the host compiler).
      hdrs: headers every source may include; labels named in copts' $(execpath ...) go here too.
      copts: nvcc flags for every source (make variables and $(execpath) expanded); also passed to the
        link, which device-links relocatable device code for the same architectures.
      link_inputs: libraries to link; labels named in linkopts' $(execpath ...) go here too.
      linkopts: further nvcc flags for the link.
      relocatable_device_code: compile with -rdc=true (device code calling into other objects, such as
        NVSHMEM's device library); nvcc then device-links at the link.
      **kwargs: passed to the link rule (visibility, tags).
    """
    rdc = ["-rdc=true"] if relocatable_device_code else []
    objects = []
    for src in srcs:
        obj = _object_path(name, src)
        native.genrule(
            name = "{}_compile_{}".format(name, src.replace("/", "_").replace(".", "_")),
            srcs = [src] + hdrs,
            outs = [obj],
            cmd = _PRIVATE_TMPDIR + "{nvcc} -c {copts} $(location {src}) -o $@".format(
                nvcc = nvcc,
                copts = " ".join(rdc + copts),
                src = src,
            ),
            message = "nvcc " + src,
        )
        objects.append(obj)
    native.genrule(
        name = name,
        srcs = objects + link_inputs + hdrs,
        outs = ["{}.so".format(name)],
        cmd = _PRIVATE_TMPDIR + "{nvcc} -shared {copts} {objects} {linkopts} -o $@".format(
            nvcc = nvcc,
            copts = " ".join(rdc + copts),
            objects = " ".join(["$(location {})".format(obj) for obj in objects]),
            linkopts = " ".join(linkopts),
        ),
        message = "nvcc -shared {}.so".format(name),
        **kwargs
    )
