"""Compile our Triton attention kernels for Hopper (sm_90a) WITHOUT a GPU and report what
ptxas says: registers, spills, shared memory, and its performance warnings.

Why: ptxas warning C7515 ("wgmma.mma_async instructions are serialized ...") silently
serialises every matrix instruction of a kernel; it is invisible in timings until one
looks. An `if` around a tile's matrix products triggered it (bench/NOTES.md, v6). Needs
only the `triton` wheel (it bundles ptxas), so it runs on any x86 machine.

    python bench/kernel_resources.py            # the configured blocks and the sweep's
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import types

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# The kernels module imports jax_triton, which needs a GPU jaxlib; compiling needs none.
sys.modules.setdefault("jax_triton", types.ModuleType("jax_triton"))
from longvila_jax.kernels import triton as kernels  # noqa: E402

KERNELS = {"FWD": kernels._fwd_kernel, "BWD_KV": kernels._bwd_kv_kernel,
           "BWD_Q": kernels._bwd_q_kernel}
_BF16 = {"q", "k", "v", "out", "do", "dq", "dk", "dv"}
_I32 = {"q_pos", "kv_pos", "q_seg", "kv_seg", "q_stats", "kv_stats", "ranges"}
_F32 = {"lse", "lse2", "delta"}


def compile_report(name: str, config, *, seq=32768, heads=32, kv_heads=8, head_dim=128,
                   causal=True) -> dict:
    """ptxas facts for kernel `name` ('FWD', 'BWD_KV', 'BWD_Q') at `config`, a `Blocks` or a
    plain (block_m, block_n, num_warps, num_stages) tuple."""
    fn = KERNELS[name]
    bm, bn, warps, stages = config
    const = dict(NB=1, SQ=seq, SKV=seq, H=heads, KH=kv_heads, D=head_dim,
                 BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_M=bm, BLOCK_N=bn,
                 CAUSAL=causal, WIDE_Q=False, WIDE_KV=False)
    signature, constants, attrs = {}, {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in ("scale_log2", "scale"):
            signature[arg] = "fp32"
            continue
        if arg not in _BF16 | _I32 | _F32:
            signature[arg], constants[arg] = "constexpr", const[arg]
            continue
        signature[arg] = "*bf16" if arg in _BF16 else "*i32" if arg in _I32 else "*fp32"
        attrs[(i,)] = [["tt.divisibility", 16]]
    ptxas = triton.__path__[0] + "/backends/nvidia/bin/ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        # Under pytest on the GPU machine Triton found no cache folder; give it one.
        cache_dir, triton.knobs.cache.dir = triton.knobs.cache.dir, tmp
        try:
            compiled = triton.compile(ASTSource(fn, signature, constants, attrs),
                                      target=GPUTarget("cuda", 90, 32),
                                      options=dict(num_warps=warps, num_stages=stages))
        finally:
            triton.knobs.cache.dir = cache_dir
        with open(f"{tmp}/k.ptx", "w") as f:
            f.write(compiled.asm["ptx"])
        log = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", f"{tmp}/k.ptx", "-o",
                              f"{tmp}/k.cubin"], capture_output=True, text=True, check=True).stderr
    registers = spills = 0
    warnings = []
    for line in log.splitlines():
        if "Used" in line and "registers" in line:
            registers = int(line.split("Used")[1].split()[0])
        if "spill stores" in line:
            spills = int(line.split("bytes spill stores")[0].split(",")[-1])
        if "Potential Performance Loss" in line:
            warnings.append(line.split(": (")[1].split(")")[0])
    return dict(kernel=name, config=tuple(config), shared=compiled.metadata.shared,
                registers=registers, spill_bytes=spills, warnings=sorted(set(warnings)))


def main():
    from attention import SWEEP  # bench/attention.py (run as `python bench/NAME.py`)

    print(f"{'kernel':>7} {'config':>20} {'smem KB':>8} {'regs':>5} {'spill B':>8}  warnings")
    for name in KERNELS:
        chosen = tuple(getattr(kernels, name))  # plain, to print like the sweep's
        for config in dict.fromkeys([chosen, *SWEEP[name]]):
            r = compile_report(name, config)
            mark = "*" if config == chosen else " "
            print(f"{name:>7} {mark}{config!s:>19} {r['shared'] / 1024:8.0f} {r['registers']:5d} "
                  f"{r['spill_bytes']:8d}  {', '.join(r['warnings']) or '-'}", flush=True)


if __name__ == "__main__":
    main()
