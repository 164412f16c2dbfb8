"""The Triton log-prob kernels lower to a GPU binary (sm_90 cubin) on a machine without a GPU.

test_kernels.py runs the kernels under TRITON_INTERPRET=1, which never type-checks them for a real target;
this compiles them ahead of time in a fresh process (interpreter off), so a kernel that only the GPU compiler
rejects fails in CPU CI too.
"""
import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton", reason="triton is not importable (pip install triton)")

COMPILE_SCRIPT = textwrap.dedent("""
    import inspect
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from minitagpr.kernels import triton_logprob as K

    def signature(kernel, dtype):
        sig = {}
        for name in inspect.signature(kernel.fn).parameters:
            if name.isupper():
                sig[name] = "constexpr"
            elif name == "t_ptr":
                sig[name] = "*i64"
            elif name in ("h_ptr", "w_ptr", "dz_ptr"):
                sig[name] = "*" + dtype
            elif name.endswith("_ptr"):
                sig[name] = "*fp32"
            else:
                sig[name] = "fp32" if name == "inv_tau" else "i32"
        return sig

    for dtype, precision, blocks in (("bf16", "tf32", dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=64)),
                                     ("fp32", "ieee", dict(BLOCK_N=64, BLOCK_V=128, BLOCK_K=32))):
        for kernel in (K._logprob_fwd_kernel, K._dlogits_kernel):
            constexprs = dict(WITH_ENTROPY=True, PRECISION=precision, UPCAST=False, **blocks)
            source = ASTSource(fn=kernel, signature=signature(kernel, dtype), constexprs=constexprs)
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                      options=dict(num_warps=8, num_stages=3))
            assert compiled.asm["cubin"], kernel.fn.__name__
            print(kernel.fn.__name__, dtype, "ok")
""")


def test_triton_kernels_compile_for_sm90_without_a_gpu():
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("this triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the current default, set to silence triton 3.9's notice
    result = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(" ok") == 4
