"""benchmarks/deepgemm_build.py without a GPU: how it names each library it links."""


def test_link_flag_takes_the_plain_name_else_the_versioned_file(benchmark_script, tmp_path):
    """A folder with libX.so links -lX; one with only libX.so.13 (pip's CUDA libraries ship so) links that file by
    name; the plain name wins over a versioned one in an earlier folder; a library nowhere stays -lX, so the
    linker names what it lacks."""
    link_flag = benchmark_script("deepgemm_build").link_flag
    plain, versioned = tmp_path / "plain", tmp_path / "versioned"
    plain.mkdir()
    versioned.mkdir()
    (plain / "libcublas.so").write_text("")
    (versioned / "libcublas.so.13").write_text("")
    (versioned / "libnvrtc.so.13").write_text("")
    (versioned / "libnvrtc.so.13.0.88").write_text("")
    dirs = [str(versioned), str(plain)]
    assert link_flag("cublas", dirs) == "-lcublas"
    assert link_flag("nvrtc", dirs) == "-l:libnvrtc.so.13"
    assert link_flag("torch", dirs) == "-ltorch"


def _wheel_and_sources(tmp_path):
    """A folder laid out as pip leaves the 0.1.7 wheel and tvm-ffi (`--target`), and a sources folder."""
    target, sources = tmp_path / "target", tmp_path / "src"
    for d in ("deep_gemm/include/cute", "deep_gemm/include/cutlass", "deep_gemm/include/deep_gemm", "tvm_ffi/include",
              "tvm_ffi/lib"):
        (target / d).mkdir(parents=True)
    (target / "deep_gemm" / "__init__.py").write_text("WHEEL = True\n")
    (target / "deep_gemm" / "include" / "cute" / "tensor.hpp").write_text("// the wheel's CUTLASS\n")
    (target / "deep_gemm" / "include" / "deep_gemm" / "old.cuh").write_text("// the wheel's kernels\n")
    (target / "tvm_ffi" / "__init__.py").write_text("raise ImportError('not importable here')\n")
    for d in ("deep_gemm/include/deep_gemm", "csrc", "third-party/fmt/include/fmt"):
        (sources / d).mkdir(parents=True)
    (sources / "deep_gemm" / "__init__.py").write_text("SOURCES = True\n")
    (sources / "deep_gemm" / "include" / "deep_gemm" / "new.cuh").write_text("// the sources' kernels\n")
    (sources / "csrc" / "tvm_ffi_api.cpp").write_text("// module\n")
    (sources / "SOURCE").write_text("someone/DeepGEMM dev abc; fmtlib/fmt def\n")
    return target, sources


def test_the_build_replaces_the_package_keeps_the_wheels_cutlass_and_compiles_once(benchmark_script, tmp_path,
                                                                                  monkeypatch):
    """The sources' `deep_gemm/` replaces the wheel's, the wheel's CUTLASS headers are kept beside the sources'
    kernels, the SOURCE line lands in the package (the probe reads it), and $CXX compiles `csrc/tvm_ffi_api.cpp`
    into `deep_gemm/_C.so` with tvm-ffi's folders, found without importing it; the compiler's status is returned."""
    build = benchmark_script("deepgemm_build")
    target, sources = _wheel_and_sources(tmp_path)
    calls = tmp_path / "cxx_calls.txt"
    cxx = tmp_path / "fake-cxx"
    cxx.write_text(f"#!/bin/sh\necho \"$@\" >> '{calls}'\n[ \"$1\" = --version ] && echo 'fake 1.0'\nexit 0\n")
    cxx.chmod(0o755)
    monkeypatch.setenv("CXX", str(cxx))
    monkeypatch.setattr("sys.path", list(__import__("sys").path))
    assert build.main(str(target), str(sources)) == 0
    pkg = target / "deep_gemm"
    assert (pkg / "__init__.py").read_text() == "SOURCES = True\n"
    assert (pkg / "include" / "cute" / "tensor.hpp").exists() and (pkg / "include" / "deep_gemm" / "new.cuh").exists()
    assert not (pkg / "include" / "deep_gemm" / "old.cuh").exists()
    assert (pkg / "SOURCE").read_text().startswith("someone/DeepGEMM dev abc")
    compile_line = [line for line in calls.read_text().splitlines() if "tvm_ffi_api.cpp" in line]
    assert len(compile_line) == 1
    words = compile_line[0].split()
    assert f"-I{target / 'tvm_ffi' / 'include'}" in words and f"-L{target / 'tvm_ffi' / 'lib'}" in words
    assert words[words.index("-o") + 1] == str(pkg / "_C.so") and "-ltvm_ffi" in words


def test_the_build_refuses_missing_inputs_before_touching_the_wheel(benchmark_script, tmp_path, monkeypatch, capsys):
    """Sources without csrc/ (or a folder with no tvm-ffi, or no compiler): exit 2 naming what is missing, the
    wheel's package left as it was."""
    build = benchmark_script("deepgemm_build")
    target, sources = _wheel_and_sources(tmp_path)
    monkeypatch.setattr("sys.path", list(__import__("sys").path))
    (sources / "csrc" / "tvm_ffi_api.cpp").unlink()
    (sources / "csrc").rmdir()
    assert build.main(str(target), str(sources)) == 2
    assert "csrc" in capsys.readouterr().err
    assert (target / "deep_gemm" / "__init__.py").read_text() == "WHEEL = True\n"
    target, sources = _wheel_and_sources(tmp_path / "two")
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert build.main(str(target), str(sources)) == 2
    assert "no C++ compiler" in capsys.readouterr().err
    assert (target / "deep_gemm" / "__init__.py").read_text() == "WHEEL = True\n"
    monkeypatch.delenv("CXX")
    target, sources = _wheel_and_sources(tmp_path / "three")
    (target / "tvm_ffi" / "__init__.py").unlink()
    for d in ("include", "lib", ""):
        (target / "tvm_ffi" / d).rmdir()
    assert build.main(str(target), str(sources)) == 2
    assert "no tvm_ffi package" in capsys.readouterr().err
    assert (target / "deep_gemm" / "__init__.py").read_text() == "WHEEL = True\n"
