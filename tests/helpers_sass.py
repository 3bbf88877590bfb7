"""Read the SASS of a compiled kernel and check that its sequential loop is software-pipelined.

The recurrence kernels walk time in a loop. Pipelined, each pass through the loop issues the
global loads of the *next* step, then does this step's math and stores on values loaded one pass
earlier, so a load's latency overlaps a whole step's work. Not pipelined, a pass loads step t's
inputs and computes on them at once: the warp waits a full memory latency every step.

What :func:`loop_problems` looks for, in the SASS text of ``nvdisasm`` or ``cuobjdump -sass``
(both ship with Triton; no GPU needed):

1. the loop: a branch ``BRA 0x...`` to an earlier address (the back-edge); the body is the
   straight run of instructions from its target to the branch (one pass). The kernels' bodies
   are predicated straight-line code, so program order inside the body is what the warp issues.
2. the loads are issued before the stores: every ``LDG`` of the body comes before its first
   ``STG``.
3. what the loads feed: a register is *tainted* once an ``LDG`` of this pass writes it, and so is
   every register (or predicate) an instruction computes from a tainted one, in program order
   from the top of the body. No ``STG`` may store a tainted value, and no floating-point
   instruction (``FADD``, ``FFMA``, ``MUFU``, ``FSEL``, ...) may read one: the pass's loads reach
   math and stores only through the back-edge, i.e. they are the next step's. Integer moves,
   byte permutes and shifts may read them: that is the register rotation at the end of the pass
   (``PRMT R19, R16, ...``) and the widening of bf16 to fp32, neither of them the step's math.

A loop that loads and uses step t in one pass fails 3 whichever way the compiler rotates it (or
2, when the rotation puts the loads after the stores). A later ptxas that rotated a pipelined loop
so that its loads sit after the stores would fail 2 as well: look at the SASS before loosening it.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import triton

NVDISASM = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"

# One instruction line, "/*0250*/  @!P2 LDG.E.U16 R9, desc[UR6][R10.64] ;" (nvdisasm and
# cuobjdump -sass alike), or one of nvdisasm's label lines, ".L_x_0:", naming the next instruction.
_LINE = re.compile(
    r"/\*([0-9a-f]{4,})\*/\s+(?:@(!?U?P[0-7T])\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);|^(\.L\w+):", re.M
)
_REG = re.compile(r"(?<![\w.])(U?R(?:\d+)|U?P[0-6])(\.64|\.128)?(?![\w])")
_FLOAT = {
    "FADD", "FMUL", "FFMA", "FMNMX", "FSETP", "FSET", "FSEL", "MUFU", "FCHK", "FRND", "F2F", "F2I",
    "I2F", "F2FP", "HADD2", "HMUL2", "HFMA2", "HSETP2", "HMNMX2", "DADD", "DMUL", "DFMA", "DSETP",
}  # fmt: skip
_LOADS, _STORES = {"LDG", "LD"}, {"STG", "ST"}


@dataclass(frozen=True)
class Instr:
    """One SASS instruction: address, guard predicate (e.g. ``!P2``), opcode, operand texts."""

    addr: int
    guard: str | None
    op: str
    operands: tuple[str, ...]

    @property
    def base(self) -> str:
        return self.op.split(".")[0]

    def width(self) -> int:
        """Registers a load writes or a store reads: 2 for ``.64``, 4 for ``.128``."""
        return 4 if ".128" in self.op else 2 if ".64" in self.op else 1


def disassemble(cubin: bytes) -> str:
    """The SASS text of a cubin, by the nvdisasm that ships with Triton: what ``cuobjdump -sass``
    runs, here without its dataflow analysis (comments only, and half the time)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        command = [str(NVDISASM), "--no-dataflow", "--print-code", str(path)]
        run = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if run.returncode != 0:
        raise RuntimeError(f"nvdisasm failed: {run.stderr.strip()}")
    return run.stdout


def parse(sass: str) -> list[Instr]:
    """The instructions of the (one) kernel in ``sass``, in address order. A branch to a label
    (nvdisasm's ``BRA `(.L_x_0)``) gets the label's address instead, as cuobjdump prints it."""
    out, labels, pending = [], {}, []
    for m in _LINE.finditer(sass):
        if m.group(5):
            pending.append(m.group(5))
            continue
        addr = int(m.group(1), 16)
        labels.update((label, addr) for label in pending)
        pending = []
        operands = tuple(o.strip() for o in m.group(4).split(",") if o.strip())
        out.append(Instr(addr, m.group(2), m.group(3), operands))
    for i, ins in enumerate(out):
        label = (
            re.fullmatch(r"`\((\.L\w+)\)", ins.operands[-1]) if ins.base == "BRA" and ins.operands else None
        )
        if label and label.group(1) in labels:
            out[i] = Instr(ins.addr, ins.guard, ins.op, (*ins.operands[:-1], hex(labels[label.group(1)])))
    return out


def _regs(operand: str, width: int = 1) -> set[str]:
    """The registers and predicates an operand names; ``R4.64`` or a wide operand: R4, R5, ..."""
    regs = set()
    for name, suffix in _REG.findall(operand):
        n = {".64": 2, ".128": 4}.get(suffix, width) if name.lstrip("U").startswith("R") else 1
        prefix, number = re.fullmatch(r"(U?[RP])(\d+)", name).groups()
        regs.update(f"{prefix}{int(number) + k}" for k in range(n))
    return regs


def _dests_and_sources(ins: Instr) -> tuple[set[str], set[str]]:
    """(written, read) registers. The first operand is written; so is the second when it is a
    predicate (ISETP's and LOP3's second predicate, IADD3's carry-out); ``.WIDE`` writes a pair."""
    ops = ins.operands
    if not ops or ins.base in _STORES or ins.base in ("BRA", "EXIT", "BAR", "STL", "STS", "RED"):
        return set(), set().union(*(_regs(o) for o in ops)) if ops else set()
    width = ins.width() if ins.base in _LOADS or ins.base == "LDL" else 2 if ".WIDE" in ins.op else 1
    dests = _regs(ops[0], width)
    rest = list(ops[1:])
    if rest and re.fullmatch(r"U?P[0-6T]", rest[0]):
        dests |= _regs(rest.pop(0))
    return dests, set().union(*(_regs(o) for o in rest)) if rest else set()


def back_edges(instrs: list[Instr]) -> list[tuple[int, int]]:
    """(first, last) instruction indices of each loop body: a branch to an earlier address."""
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    loops = []
    for i, ins in enumerate(instrs):
        if ins.base != "BRA":
            continue
        targets = [int(o, 16) for o in ins.operands if re.fullmatch(r"0x[0-9a-f]+", o)]
        if targets and targets[0] < ins.addr and targets[0] in index:  # (a branch to itself is the trap)
            loops.append((index[targets[0]], i - 1))
    return loops


def loop_problems(instrs: list[Instr]) -> list[str]:
    """What breaks the pipelining rules of the module docstring in every loop with a global load
    (empty: the loops are pipelined). No such loop at all is a problem too."""
    problems, checked = [], 0
    for first, last in back_edges(instrs):
        body = instrs[first : last + 1]
        loads = [ins for ins in body if ins.base in _LOADS]
        if not loads:
            continue
        checked += 1
        where = f"loop {body[0].addr:#06x}–{instrs[last + 1].addr:#06x}"
        stores = [ins for ins in body if ins.base in _STORES]
        late = [ins for ins in loads if stores and ins.addr > stores[0].addr]
        problems += [
            f"{where}: {ins.op} at {ins.addr:#06x} after the first store at {stores[0].addr:#06x}"
            for ins in late
        ]
        problems += [f"{where}: {p}" for p in _same_pass_uses(body)]
    if not checked:
        problems.append("no loop with a global load found")
    return problems


def _same_pass_uses(body: list[Instr]) -> list[str]:
    """Stores and floating-point instructions of one pass that read a value loaded in that pass."""
    taint: dict[str, int] = {}  # register -> the address of the load its value comes from
    spilled: int | None = None
    found = []
    for ins in body:
        dests, sources = _dests_and_sources(ins)
        if ins.guard:
            sources |= _regs(ins.guard.lstrip("!"))
        origin = next((taint[r] for r in sorted(sources) if r in taint), None)
        if ins.base in _STORES:
            data = _regs(ins.operands[-1], ins.width()) if ins.operands else set()
            hit = next((taint[r] for r in sorted(data) if r in taint), None)
            if hit is not None:
                found.append(
                    f"{ins.op} at {ins.addr:#06x} stores a value loaded at {hit:#06x} in the same pass"
                )
            continue
        if ins.base in _FLOAT and origin is not None:
            found.append(
                f"{ins.op} at {ins.addr:#06x} computes on a value loaded at {origin:#06x} in the same pass"
            )
        if ins.base == "STL" and origin is not None:  # a spill of a loaded value: its reload is tainted
            spilled = origin
        if ins.base in _LOADS:
            origin = ins.addr
        elif ins.base == "LDL":
            origin = spilled
        for r in dests - {"RZ", "PT", "URZ", "UPT"}:
            if origin is not None:
                taint[r] = origin
            elif not ins.guard:  # an unconditional write of an untainted value clears the taint
                taint.pop(r, None)
    return found
