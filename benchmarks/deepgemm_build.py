"""Build DeepGEMM's tvm-ffi module (`deep_gemm/_C.so`) against the torch this machine runs.

The `sgl-deep-gemm` wheel ships a `_C.so` built against another torch; under torch 2.11 its grouped calls read
the tensors they are handed wrongly (its own check `dim == 2 or dim == 3` fails on 2-D and 3-D tensors). This
script takes a folder the wheel (and `apache-tvm-ffi`) was installed into with `pip --target`, lays DeepGEMM's
sources over it (a folder holding `deep_gemm/`, `csrc/` and `third-party/fmt/include`, from one commit of
sgl-project/DeepGEMM), keeps the wheel's CUTLASS headers, and compiles `csrc/tvm_ffi_api.cpp` with one `c++`
call (no ninja needed). Usage: python deepgemm_build.py TARGET SOURCES."""
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import time


def link_flag(lib: str, dirs: list) -> str:
    """-lNAME, or -l:libNAME.so.N where a folder has only the versioned file (pip's CUDA libraries)."""
    for d in dirs:
        if os.path.exists(os.path.join(d, f"lib{lib}.so")):
            return f"-l{lib}"
    for d in dirs:
        found = sorted(glob.glob(os.path.join(d, f"lib{lib}.so.*")))
        if found:
            return f"-l:{os.path.basename(found[0])}"
    return f"-l{lib}"


def main(target: str, sources: str) -> int:
    wheel_include = os.path.join(target, "deep_gemm", "include")
    keep = os.path.join(target, "_wheel_include")
    shutil.rmtree(keep, ignore_errors=True)
    shutil.move(wheel_include, keep)                      # cute/ and cutlass/ of the wheel
    shutil.rmtree(os.path.join(target, "deep_gemm"))
    shutil.copytree(os.path.join(sources, "deep_gemm"), os.path.join(target, "deep_gemm"))
    for name in ("cute", "cutlass"):
        shutil.copytree(os.path.join(keep, name), os.path.join(target, "deep_gemm", "include", name))
    shutil.copytree(os.path.join(sources, "csrc"), os.path.join(target, "csrc"))
    shutil.copytree(os.path.join(sources, "third-party"), os.path.join(target, "third-party"))
    with open(os.path.join(sources, "SOURCE")) as f:
        print("sources:", f.read().strip(), flush=True)

    sys.path.insert(0, target)
    import importlib.util

    import torch
    # tvm-ffi's headers and library where pip put them (found without importing it: its module needs its Python)
    tvm_ffi_dir = importlib.util.find_spec("tvm_ffi").submodule_search_locations[0]

    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    torch_dir = os.path.dirname(torch.__file__)
    site = os.path.dirname(torch_dir)
    nvidia_inc = sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
    nvidia_lib = sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib")))
    includes = [os.path.join(tvm_ffi_dir, "include"), f"{cuda_home}/include",
                f"{cuda_home}/include/cccl", *nvidia_inc, sysconfig.get_path("include"),
                os.path.join(torch_dir, "include"), os.path.join(torch_dir, "include", "torch", "csrc", "api", "include"),
                os.path.join(target, "deep_gemm", "include"), os.path.join(target, "third-party", "fmt", "include")]
    libdirs = [os.path.join(tvm_ffi_dir, "lib"), f"{cuda_home}/lib64", *nvidia_lib,
               os.path.join(torch_dir, "lib")]
    libs = ["tvm_ffi", "cudart", "nvrtc", "cublasLt", "cublas", "torch", "torch_cpu", "c10", "c10_cuda", "torch_cuda"]
    out = os.path.join(target, "deep_gemm", "_C.so")
    cmd = ["c++", "-std=c++17", "-O2", "-fPIC", "-shared", "-Wno-psabi", "-Wno-deprecated-declarations",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}",
           *[f"-I{p}" for p in includes if os.path.isdir(p)],
           os.path.join(target, "csrc", "tvm_ffi_api.cpp"), "-o", out,
           *[f"-L{p}" for p in libdirs if os.path.isdir(p)],
           *[f"-Wl,-rpath,{p}" for p in libdirs if os.path.isdir(p)],
           *[link_flag(lib, libdirs) for lib in libs]]
    print("$", " ".join(cmd), flush=True)
    start = time.time()
    rc = subprocess.run(cmd).returncode
    print(f"c++ rc {rc} in {time.time() - start:.0f} s", flush=True)
    return rc


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))
