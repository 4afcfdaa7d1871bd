"""
What the log-prob kernels cost a Hopper GPU (H100, H200) in instructions, counted without a GPU.

    python -m pytest bench/bench_sass.py -s

Triton compiles a kernel for any target ahead of time, and its wheel carries NVIDIA's ptxas and
nvdisasm. So on any machine this compiles each kernel of kernels/logprob.py for sm_90 with bf16
logits (then float32 ones), at every config the GPU autotuner tries (block size, warps, STAGES),
and reads the machine code (SASS). A kernel walks a row in two loops: the blocks wholly inside the
row, then the (at most two) blocks across its ends. For one iteration of each, it counts the
instructions one thread issues, and from those the instructions per vocabulary entry of a whole row
of V = 50257 entries (head 0: one row's inside blocks at the inner count, its two end blocks at the
end loop's). Where a loop has branches, it follows the path that skips every if-block without a
16-byte access: an end block read without a mask (the first one), and for kernels of one loop
(commit c4499d7 and earlier) a block inside the row. A masked last block issues more, so a row's
count is a lower bound. It also counts exponentials (MUFU) and barriers between warps, and the
width of the accesses. A pipelined loop (STAGES > 1) reads its blocks from shared memory (LDS),
where asynchronous copies (LDGSTS) put them one or two blocks ahead; Triton puts two barriers a
block around those buffers, though each thread reads back only what it copied.

Why instructions: these kernels read 2 bytes an entry of bf16 (KL's forward 4, from two tensors),
so at the copy bandwidth of an H200 (about 4.2 TB/s in BENCHMARKS.md's runs) each of its 132 SMs
must take in about 8 entries a clock at 1.98 GHz, and an SM issues at most 128 thread-instructions
a clock (4 schedulers, one warp instruction each). A kernel that issues I instructions an entry
cannot go faster than 128 / I entries a clock per SM, whatever the memory: the last column is that
ceiling in GB/s, as a share of the copy bandwidth. It is a bound from a count, not a measurement:
memory latency, the barriers and the masked blocks cost more. The compiler is this machine's
Triton; the GPU's may schedule differently (BENCHMARKS.md says which one a table used).
"""

import collections
import importlib.util
import os
import re
import subprocess
import tempfile

import pytest
import triton

import kernels.logprob

SMS, CLOCK_HZ, COPY_GBS = 132, 1.98e9, 4200  # an H200 (SXM): SMs, boost clock, measured copy GB/s
ISSUE_PER_CLOCK = 128  # thread-instructions an SM issues a clock: 4 schedulers x 32 lanes
V = 50257  # GPT-2's vocabulary: rows that start anywhere, and a partial last block
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")

# kernel -> entries of [N, V] tensors it reads and writes per vocabulary entry of a row
KERNELS = {
    "_logprob_fwd_kernel": 1, "_logprob_bwd_kernel": 2,
    "_entropy_fwd_kernel": 1, "_entropy_bwd_kernel": 2,
    "_kl_fwd_kernel": 2, "_kl_bwd_kernel": 3,
}
BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}  # bytes of an entry of logits
LOGITS = {"logits_ptr", "grad_logits_ptr", "p_ptr", "q_ptr", "grad_p_ptr"}  # [N, V], the logits' dtype

HAVE_TOOLS = all(os.path.exists(os.path.join(BIN, tool)) for tool in ("nvdisasm", "cuobjdump"))
pytestmark = pytest.mark.skipif(not HAVE_TOOLS, reason=f"needs Triton's NVIDIA tools in {BIN}")


def compilable_logprob():
    """kernels/logprob.py loaded afresh with the interpreter off: under TRITON_INTERPRET=1 (the
    test suite's setting) @triton.jit makes Python functions for the interpreter, which Triton
    cannot compile."""
    saved = triton.knobs.runtime.interpret
    triton.knobs.runtime.interpret = False
    try:
        spec = importlib.util.spec_from_file_location("logprob_sm90", kernels.logprob.__file__)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        triton.knobs.runtime.interpret = saved


def signature(fn, logits="bf16"):
    """Argument types as a launch on logits of V = 50257 (bf16, or `logits`) would specialize them."""
    sig = {}
    for name in fn.arg_names:
        if name in LOGITS:
            sig[name] = "*" + logits
        elif name == "targets_ptr":
            sig[name] = "*i64"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name in ("stride", "V"):
            sig[name] = "i32"
        elif name == "inv_temperature":
            sig[name] = "fp32"
        else:
            sig[name] = "constexpr"
    return sig


def compile_sm90(kernel, config, logits="bf16"):
    """(PTX, SASS, registers per thread) of an autotuned kernel at one of its configs."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = kernel.fn  # the JITFunction under the autotuner
    sig = signature(fn, logits)
    constexprs = {**config.kwargs, "IGNORE_INDEX": kernels.logprob.IGNORE_INDEX}
    constexprs = {k: v for k, v in constexprs.items() if k in sig}
    # torch allocations are 16-byte aligned, and the launcher tells Triton so at run time
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(sig) if sig[a].startswith("*")}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    # FMA fusion on: Triton 3.6-3.9's default, with which the kernels launch (3.10 turns it off)
    options = {"num_warps": config.num_warps, "enable_fp_fusion": True}
    if config.maxnreg:
        options["maxnreg"] = config.maxnreg
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = run_tool("nvdisasm", "-c", cubin)
        regs = int(re.search(r"REG:(\d+)", run_tool("cuobjdump", "-res-usage", cubin)).group(1))
    return compiled.asm["ptx"], sass, regs


def run_tool(tool, *args):
    return subprocess.run([os.path.join(BIN, tool), *args], check=True, capture_output=True,
                          text=True).stdout


INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z0-9_]+)([.\w]*)\s*([^;]*);")
LABEL = re.compile(r"^(\.L_x_\d+):")
# guard: the predicate, "@P0", "@!PT" (never runs: ptxas puts a few before asynchronous copies), or ""
Instruction = collections.namedtuple("Instruction", "guard op mods operands")


def parse(sass):
    """[Instruction] in code order, and label -> index of the instruction it marks."""
    code, labels = [], {}
    for line in sass.splitlines():
        label = LABEL.match(line.strip())
        if label:
            labels[label.group(1)] = len(code)
            continue
        m = INSTRUCTION.search(line)
        if m:
            code.append(Instruction((m.group(1) or "").strip(), m.group(2), m.group(3), m.group(4)))
    return code, labels


# global loads and stores, asynchronous copies from global to shared memory, loads from shared
ACCESSES = ("LDG", "STG", "LDGSTS", "LDS")


def wide(instruction):
    """A 16-byte access: what every access of an unmasked block should be."""
    return instruction.op in ACCESSES and instruction.mods.endswith(".128")


def access(instruction):
    """An access and its width: LDG.E.128 -> LDG128, STG.E.U16 -> STGU16, LDS.128 -> LDS128,
    LDG.E -> LDG (4 bytes)."""
    last = instruction.mods.split(".")[-1]
    return instruction.op + (last if last in ("64", "128", "U16", "S16", "U8", "S8") else "")


def loop_paths(code, labels):
    """One iteration of each loop that loads from global memory, in code order (for the kernels of
    kernels/logprob.py: the blocks inside the row, then the ends), along the path of an unmasked
    block: a conditional forward branch is taken unless the code it jumps over has a 16-byte
    access (an if-block of masked accesses, or the first block's fix-up, is skipped; the unmasked
    side of an if-else kept); an unconditional one is always taken."""
    def target(i):
        m = re.search(r"(\.L_x_\d+)", code[i].operands) if code[i].op == "BRA" else None
        return labels.get(m.group(1)) if m else None
    paths = []
    for start, end in sorted((target(i), i) for i in range(len(code))
                             if target(i) is not None and target(i) <= i):
        if any(c.op in ("LDG", "LDGSTS") for c in code[start:end + 1]):
            path, i = [], start
            while i < end:
                path.append(code[i])
                t = target(i)
                jump = t is not None and start < t <= end and (
                    not code[i].guard or not any(map(wide, code[i + 1:t])))
                i = t if jump else i + 1
            paths.append(path + [code[end]])
    assert paths, "no loop with a global load"
    return paths


def summary(module, name, config, logits="bf16"):
    """What kernel `name` of module costs at config, per iteration and per entry of a row of V."""
    ptx, sass, regs = compile_sm90(getattr(module, name), config, logits)
    paths = loop_paths(*parse(sass))
    inner, ends = paths[0], paths[-1]  # a kernel of one loop pays its inner count at the ends too
    block, threads = config.kwargs["BLOCK_V"], 32 * config.num_warps
    last = max(V // block, 1) * block  # as kernels/logprob.py's _blocks, for a row with head 0
    n_inner, n_ends = last // block - 1, 1 + (last < V)
    per_entry = (n_inner * len(inner) + n_ends * len(ends)) / (V / threads)
    widths = collections.Counter(access(c) for c in inner if c.op in ACCESSES and c.guard != "@!PT")
    return dict(regs=regs, inner=len(inner), ends=len(ends), inside=n_inner * block / V,
                per_entry=per_entry, mufu=sum(c.op == "MUFU" for c in inner) / (block / threads),
                bar=sum(c.op == "BAR" for c in inner), widths=widths,
                local=sum(c.op in ("LDL", "STL") for c in inner),  # spilled registers, in the loop
                ceiling=ISSUE_PER_CLOCK * SMS * CLOCK_HZ / per_entry * KERNELS[name] * BYTES[logits] / 1e9,
                inner_ops=[c.op + c.mods for c in inner if c.guard != "@!PT"],  # those that run
                exp2=sorted(set(re.findall(r"ex2\.approx[.\w]*", ptx))),
                maxnreg=[int(n) for n in re.findall(r"\.maxnreg (\d+)", ptx)])  # the cap, in the PTX


def checks(config_indices, logits="bf16"):
    """{kernel: {config: dict(loop: its inner loop's opcodes with modifiers, exp2: the PTX ex2 forms,
    stages: STAGES, regs: registers a thread, cap: the config's cap on them or None, ptx_cap: the
    PTX's .maxnreg directives)}} at GPU_CONFIGS[i] for i in config_indices, for logits of one dtype,
    for tests/test_logprob.py. It calls this in a process of its own: Triton's interpreter, once it
    has run a kernel with helper functions, leaves triton.language patched, and compiling fails
    after that."""
    module = compilable_logprob()
    out = collections.defaultdict(dict)
    for name in KERNELS:
        for i in config_indices:
            config = module.GPU_CONFIGS[i]
            s = summary(module, name, config, logits)
            out[name][str(config)] = dict(loop=s["inner_ops"], exp2=s["exp2"], stages=config.kwargs["STAGES"],
                                          regs=s["regs"], cap=config.maxnreg, ptx_cap=s["maxnreg"])
    return out


@pytest.mark.parametrize("logits", ["bf16", "fp32"])
def test_instruction_counts(logits):
    print(f"\nsm_90 SASS (Triton {triton.__version__}), {logits} logits, rows of V = {V}; ceiling: "
          f"{SMS} SMs x {ISSUE_PER_CLOCK} instructions a clock x {CLOCK_HZ / 1e9:.2f} GHz over the "
          f"count an entry, against {COPY_GBS} GB/s of copy bandwidth")
    print(f"{'kernel':<20} {'BLOCK_V':>7} {'warps':>5} {'stages':>6} {'cap':>4} {'regs':>4} "
          f"{'inner':>5} {'ends':>5} {'inside':>6} {'instr/entry':>11} {'MUFU/entry':>10} {'BAR':>3} "
          f"{'local':>5}  {'accesses inside':<34} {'ceiling':>13}")
    module = compilable_logprob()
    for name in KERNELS:
        for config in module.GPU_CONFIGS:
            s = summary(module, name, config, logits)
            widths = " ".join(f"{k}x{v}" for k, v in sorted(s["widths"].items()))
            print(f"{name:<20} {config.kwargs['BLOCK_V']:>7} {config.num_warps:>5} "
                  f"{config.kwargs['STAGES']:>6} {config.maxnreg or '-':>4} {s['regs']:>4} "
                  f"{s['inner']:>5} {s['ends']:>5} {s['inside']:>6.0%} {s['per_entry']:>11.1f} "
                  f"{s['mufu']:>10.2f} {s['bar']:>3} {s['local']:>5}  {widths:<34} "
                  f"{s['ceiling']:>5.0f} ({s['ceiling'] / COPY_GBS:>4.0%})")
            # every access of a block inside the row is 16 bytes wide: the alignment of the blocks
            assert all(w.endswith("128") for w in s["widths"]), (name, s["widths"])
    print("cap: the config's maxnreg; inner, ends: instructions of one iteration over a block inside "
          "the row, and over an end block read without a mask;\ninside: the share of the row in blocks "
          "inside it; local: accesses to spilled registers in the inner loop")
