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
