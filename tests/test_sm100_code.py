"""The Blackwell family (cpp/kernels/sm100/) ships as sm_100a code that uses
the tcgen05 tensor-core instructions (issue 8): read from the built extension
with cuobjdump, on any machine (no GPU needed). Skipped when the extension has
no CUDA kernels or no cuobjdump is found (the test extra installs it)."""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import subprocess

import pytest

from jax_msa import _ffi, _jax_msa


def _cuobjdump() -> str | None:
    """cuobjdump from PATH, else from the PyPI package nvidia-cuda-cuobjdump."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        for path in sorted(glob.glob(os.path.join(root, "*", "bin", "cuobjdump"))):
            if os.access(path, os.X_OK):
                return path
    return None


def _sm100a_sass() -> dict[str, str]:
    """The extension's sm_100a SASS, function name -> its code."""
    if not _ffi.built_with_cuda():
        pytest.skip("the extension was built without CUDA kernels")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
    run = subprocess.run([tool, "--dump-sass", "--gpu-architecture", "sm_100a", _jax_msa.__file__],
                         capture_output=True, text=True, timeout=300)
    if "nvdisasm" in run.stderr:
        pytest.skip(f"cuobjdump cannot disassemble: {run.stderr.strip()}")
    assert run.returncode == 0, run.stderr
    functions = re.split(r"^\s*Function : (\S+)\s*$", run.stdout, flags=re.M)
    return dict(zip(functions[1::2], functions[2::2]))


def test_blackwell_forward_is_sm100a_tcgen05_code():
    sass = _sm100a_sass()
    kernels = {name: code for name, code in sass.items() if "attention_fwd_kernel" in name
               and "sm100" in name}
    # Sparse and dense (the bool template argument), bf16 and fp16.
    assert len(kernels) == 4, sorted(sass)
    for name, code in kernels.items():
        # Per block: S = Q K^T and O += P V, 8 steps of k = 16 each (some
        # paths are duplicated by the compiler: at least 16).
        assert len(re.findall(r"\bUTCHMMA\b", code)) >= 16, name
        assert re.search(r"\bUTCBAR\b", code), name      # tcgen05.commit -> mbarrier
        assert re.search(r"\bLDTM\.x32\b", code), name   # tcgen05.ld of S and O
        assert re.search(r"\bSTTM\.x32\b", code), name   # tcgen05.st: O's rescale
        assert re.search(r"\bUTCATOMSWS\b", code), name  # tcgen05.alloc / dealloc


def test_blackwell_block_scores_are_sm100a_tcgen05_code():
    sass = _sm100a_sass()
    kernels = {name: code for name, code in sass.items() if "block_scores_kernel" in name
               and "sm100" in name}
    # With and without sums, bf16 and fp16, Di 64 and 128.
    assert len(kernels) == 8, sorted(sass)
    for name, code in kernels.items():
        assert len(re.findall(r"\bUTCHMMA\b", code)) >= 4, name  # Di / 16 steps of k = 16
        assert re.search(r"\bUTCBAR\b", code), name
        assert re.search(r"\bLDTM\.x32\b", code), name
        assert re.search(r"\bUTCATOMSWS\b", code), name
