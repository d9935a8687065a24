"""Build DeepGEMM's tvm-ffi module (`deep_gemm/_C.so`) from one commit of its sources, against the torch this
machine runs.

The `sgl-deep-gemm` 0.1.7 wheel's `_C.so` links a torch of its own build; under torch 2.11 its grouped calls fail
its own check `dim == 2 or dim == 3` on 2-D and 3-D tensors (a module built against another torch is the likely
cause, not verified). The wheel has no `csrc/`, so this builds another DeepGEMM: the sources named in the sources
folder's SOURCE (`deep_gemm/`, `csrc/` and fmt's `third-party/fmt/include` of sgl-project/DeepGEMM at one commit)
replace the wheel's `deep_gemm/` package in a folder the wheel and `apache-tvm-ffi` were installed into with
`pip --target`; of the wheel only its CUTLASS headers (`deep_gemm/include/{cute,cutlass}`) and tvm-ffi stay. Then
`csrc/tvm_ffi_api.cpp` is compiled with one call of $CXX (default c++), no ninja needed.
Usage: python deepgemm_build.py TARGET SOURCES."""
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
    needed = [os.path.join(sources, p) for p in ("deep_gemm", "csrc", os.path.join("third-party", "fmt", "include"),
                                                 "SOURCE")]
    needed += [os.path.join(target, "deep_gemm", "include", p) for p in ("cute", "cutlass")]
    missing = [p for p in needed if not os.path.exists(p)]
    if missing:
        print("deepgemm_build: missing " + ", ".join(missing), file=sys.stderr)
        return 2
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        print(f"deepgemm_build: no C++ compiler {cxx!r} on PATH (set CXX)", file=sys.stderr)
        return 2
    sys.path.insert(0, target)
    import importlib.util
    # tvm-ffi's headers and library where pip put them; the package is not imported, as its extension needs the
    # CPython it was built for, which the machine that tries this script may not run
    spec = importlib.util.find_spec("tvm_ffi")
    if spec is None or not spec.submodule_search_locations:
        print(f"deepgemm_build: no tvm_ffi package in {target}", file=sys.stderr)
        return 2
    tvm_ffi_dir = spec.submodule_search_locations[0]

    wheel_include = os.path.join(target, "deep_gemm", "include")
    keep = os.path.join(target, "_wheel_include")
    shutil.rmtree(keep, ignore_errors=True)
    shutil.move(wheel_include, keep)                      # cute/ and cutlass/ of the wheel
    shutil.rmtree(os.path.join(target, "deep_gemm"))
    shutil.copytree(os.path.join(sources, "deep_gemm"), os.path.join(target, "deep_gemm"))
    for name in ("cute", "cutlass"):
        shutil.copytree(os.path.join(keep, name), os.path.join(target, "deep_gemm", "include", name))
    for name in ("csrc", "third-party"):
        shutil.copytree(os.path.join(sources, name), os.path.join(target, name), dirs_exist_ok=True)
    shutil.copy(os.path.join(sources, "SOURCE"), os.path.join(target, "deep_gemm", "SOURCE"))   # for the probe's log
    with open(os.path.join(sources, "SOURCE")) as f:
        print("sources:", f.read().strip(), flush=True)

    import torch

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
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.strip()
    print(f"{cxx}: {version.splitlines()[0] if version else 'no version printed'}", flush=True)
    cmd = [cxx, "-std=c++17", "-O2", "-fPIC", "-shared", "-Wno-psabi", "-Wno-deprecated-declarations",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}",
           *[f"-I{p}" for p in includes if os.path.isdir(p)],
           os.path.join(target, "csrc", "tvm_ffi_api.cpp"), "-o", out,
           *[f"-L{p}" for p in libdirs if os.path.isdir(p)],
           *[f"-Wl,-rpath,{p}" for p in libdirs if os.path.isdir(p)],
           *[link_flag(lib, libdirs) for lib in libs]]
    print("$", " ".join(cmd), flush=True)
    start = time.time()
    rc = subprocess.run(cmd).returncode
    print(f"{cxx} rc {rc} in {time.time() - start:.0f} s", flush=True)
    return rc


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))
