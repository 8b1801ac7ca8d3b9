"""Reading the programs JAX builds: collectives, custom calls, kernels and bytes in HLO text.

What the tests and benchmarks assert or report about a program (one all-reduce
each way, the CPU kernels are called, no x-sized temporary is written) is read
here from its text, in one place:

* ``lowered_text(fn, *args)``: the program JAX emits (StableHLO,
  ``Lowered.as_text()``); ``compiled_text(fn, *args)``: the program after XLA
  (HLO, ``Compiled.as_text()``).
* ``instructions(text)``: the HLO instructions, parsed (``Instruction``: name,
  shape, opcode, operand names, attributes); ``entry_only=True`` for the entry
  computation alone (what runs at the top level: kernels, library calls,
  collectives).
* ``count_ops(text, *ops)``: instructions with one of these opcodes (an async
  ``*-start``/``*-done`` pair counts once).
* ``collectives(text)``: collectives by kind, in StableHLO or HLO text;
  ``count_collectives(text)``: all of them.
* ``custom_calls(text)``: custom-call targets and how often each is called;
  ``custom_call_operands(text, target)``: the arrays each call reads.
* ``kernels(text)``: the entry computation's instructions that do work;
  ``large_outputs(text, n)``: the arrays of at least n elements they write;
  ``traffic_bytes(text, n)``: the bytes of such arrays they read and write.

Depends on jax, numpy and re only (never on the rest of jaxbn): a private
module for jaxbn's own tests and benchmarks, not part of the API.
"""

from __future__ import annotations

import collections
import re
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import numpy as np

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
# Entry-computation instructions that launch no kernel: views, plumbing and inputs.
TRIVIAL = ("parameter", "constant", "tuple", "get-tuple-element", "bitcast")


class Array(NamedTuple):
    """One array of an HLO shape: element type (``"f32"``) and dimensions."""

    dtype: str
    dims: Tuple[int, ...]

    @property
    def size(self) -> int:
        return int(np.prod(self.dims, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        if self.dtype == "pred":
            return self.size
        bits = re.search(r"\d+", self.dtype)
        return self.size * max(1, int(bits.group()) // 8) if bits else 0  # token[]: no data

    def __str__(self) -> str:
        return f"{self.dtype}[{','.join(map(str, self.dims))}]"


class Instruction(NamedTuple):
    """One HLO instruction: ``[ROOT] %name = shape op(operands), attrs``."""

    name: str  # without the leading "%"
    shape: str  # as printed, layouts included: "f32[16,8]{1,0}" or "(f32[8]{0}, f32[8]{0})"
    op: str  # opcode: "fusion", "custom-call", "all-reduce", ...
    operands: Tuple[str, ...]  # names of the operands, without "%"
    attrs: str  # the text after the operand list

    @property
    def arrays(self) -> Tuple[Array, ...]:
        """The arrays of the shape (one, or each element of a tuple)."""
        return arrays(self.shape)

    @property
    def target(self) -> Optional[str]:
        """A custom call's target (None for other instructions)."""
        m = re.search(r'custom_call_target="([^"]*)"', self.attrs)
        return m.group(1) if m else None


def arrays(shape: str) -> Tuple[Array, ...]:
    """The arrays of an HLO shape string: ``"(f32[8]{0}, s32[])"`` -> f32[8], s32[]."""
    return tuple(Array(dt, tuple(int(d) for d in dims.split(",") if d))
                 for dt, dims in re.findall(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]", shape))


def _lowerable(fn: Callable) -> Any:
    if hasattr(fn, "lower"):  # jax.jit, jax.pmap
        return fn
    import jax

    return jax.jit(fn)


def lowered_text(fn: Callable, *args, **kwargs) -> str:
    """The StableHLO JAX emits for ``fn(*args, **kwargs)`` (fn is jitted if it is not)."""
    return _lowerable(fn).lower(*args, **kwargs).as_text()


def compiled_text(fn: Callable, *args, **kwargs) -> str:
    """The HLO XLA compiles ``fn(*args, **kwargs)`` to (fn is jitted if it is not)."""
    return _lowerable(fn).lower(*args, **kwargs).compile().as_text()


_DEF = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")  # "[ROOT] %name = "
_OP = re.compile(r"\s+([a-z][\w\-]*)\(")  # " opcode(" after the shape


def _balanced(s: str, i: int) -> int:
    """Index just past the parenthesis that closes the one at s[i]."""
    depth = 0
    for j in range(i, len(s)):
        depth += (s[j] == "(") - (s[j] == ")")
        if depth == 0:
            return j + 1
    return len(s)


def _parse(line: str) -> Optional[Instruction]:
    m = _DEF.match(line)
    if not m:
        return None
    i = m.end()
    if line.startswith("(", i):  # a tuple shape
        j = _balanced(line, i)
    else:
        sp = line.find(" ", i)
        j = len(line) if sp < 0 else sp
    shape = line[i:j]
    m_op = _OP.match(line, j)
    if not m_op:
        return None
    k = _balanced(line, m_op.end() - 1)
    operands = tuple(re.findall(r"%([\w.\-]+)", line[m_op.end():k - 1]))
    return Instruction(m.group(1), shape, m_op.group(1), operands, line[k:].lstrip(", "))


def _entry(text: str) -> str:
    start = text.find("\nENTRY")
    if start < 0:
        raise ValueError("no ENTRY computation: not compiled HLO text (Compiled.as_text())")
    end = text.find("\n}", start)
    return text[start:] if end < 0 else text[start:end]


def instructions(text: str, *, entry_only: bool = False) -> List[Instruction]:
    """The instructions of HLO text (every computation's, or the entry computation's)."""
    lines = (_entry(text) if entry_only else text).splitlines()
    return [inst for inst in map(_parse, lines) if inst is not None]


def _strip_layout(shape: str) -> str:
    return re.sub(r"\{[^{}]*\}", "", shape)


def count_ops(text: str, *ops: str, shape: Optional[str] = None) -> int:
    """Instructions (in every computation) whose opcode is one of `ops`.

    An asynchronous ``op-start``/``op-done`` pair counts once. `shape`, if given,
    keeps only instructions of that shape, layouts ignored (``"pred[]"``).
    """
    n = 0
    for inst in instructions(text):
        op = inst.op[:-len("-start")] if inst.op.endswith("-start") else inst.op
        if op in ops and (shape is None or _strip_layout(inst.shape) == shape):
            n += 1
    return n


def is_stablehlo(text: str) -> bool:
    return not text.lstrip().startswith("HloModule") and "stablehlo." in text


def collectives(text: str) -> Dict[str, int]:
    """Collectives by kind (``"all-reduce"``, ... as in COLLECTIVES), in StableHLO or HLO text."""
    if is_stablehlo(text):
        found = re.findall(r"\bstablehlo\.(all_reduce|all_gather|reduce_scatter|collective_permute|all_to_all)\b",
                           text)
        counts = collections.Counter(op.replace("_", "-") for op in found)
        return {op: counts[op] for op in COLLECTIVES}
    return {op: count_ops(text, op) for op in COLLECTIVES}


def count_collectives(text: str) -> int:
    """All collectives of StableHLO or HLO text (``collectives`` summed)."""
    return sum(collectives(text).values())


def custom_calls(text: str, prefix: str = "") -> collections.Counter:
    """Custom-call targets of compiled HLO text (those starting with `prefix`), with how often each is called."""
    return collections.Counter(t for t in re.findall(r'custom_call_target="([^"]*)"', text) if t.startswith(prefix))


def custom_call_operands(text: str, target: str) -> List[Tuple[Tuple[Array, ...], ...]]:
    """For each call of custom-call `target`: the arrays of each of its operands."""
    insts = instructions(text)
    shapes = {inst.name: inst.arrays for inst in insts}
    return [tuple(shapes.get(o, ()) for o in inst.operands) for inst in insts
            if inst.op == "custom-call" and inst.target == target]


def kernels(text: str) -> List[Instruction]:
    """The entry computation's instructions that do work: fusions, library and custom calls,
    copies, collectives (not parameters, constants, tuples or bitcasts)."""
    return [inst for inst in instructions(text, entry_only=True) if inst.op not in TRIVIAL]


def large_outputs(text: str, min_elements: int) -> List[Tuple[str, Array]]:
    """(kernel name, array) for each array of at least `min_elements` a kernel of the entry
    computation writes (``kernels``)."""
    return [(inst.name, a) for inst in kernels(text) for a in inst.arrays if a.size >= min_elements]


def traffic_bytes(text: str, min_elements: int) -> int:
    """Bytes of arrays of at least `min_elements` that the entry computation's kernels move.

    Every kernel (``kernels``) is taken to read each such operand once and to write
    each such output once; smaller arrays (per-channel vectors) are left out. The
    program's memory traffic by construction, independent of the machine's load.
    """
    insts = instructions(text, entry_only=True)
    shapes = {inst.name: inst.arrays for inst in insts}

    def big(arrs):
        return sum(a.nbytes for a in arrs if a.size >= min_elements)

    return sum(big(inst.arrays) + sum(big(shapes.get(o, ())) for o in inst.operands)
               for inst in insts if inst.op not in TRIVIAL)
