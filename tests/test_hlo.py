"""jaxbn/_hlo.py, the HLO reader of the tests and benchmarks, on fixed program text."""

import jax
import jax.numpy as jnp

from jaxbn import _hlo

# A compiled module as XLA:CPU prints it (shortened): a tuple result with an
# /*index=5*/ comment in the ENTRY header, a custom call, an async all-reduce pair,
# a scalar pred[] all-reduce, a fusion writing an x-sized array.
COMPILED = """HloModule jit_f, entry_computation_layout={(f32[4,8]{1,0})->f32[4,8]{1,0}}
FileNames
1 "/tmp/a.py"
StackFrames
1 {file_location_id=1 parent_frame_id=1}
%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}
%fused_computation (p0: f32[4,8], p1: f32[8]) -> f32[4,8] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[8]{0} parameter(1)
  %bc = f32[4,8]{1,0} broadcast(%p1), dimensions={1}
  ROOT %sub = f32[4,8]{1,0} subtract(%p0, %bc)
}
ENTRY %main (x: f32[4,8], flag: pred[]) -> (f32[4,8], f32[8], f32[8], f32[8], f32[8], /*index=5*/pred[]) {
  %x = f32[4,8]{1,0} parameter(0), metadata={op_name="x"}
  %flag = pred[] parameter(1)
  %k = (f32[8]{0}, f32[8]{0}) custom-call(%x), custom_call_target="jaxbn_moments", operand_layout_constraints={f32[4,8]{1,0}}
  %m = f32[8]{0} get-tuple-element(%k), index=0
  %ars = f32[8]{0} all-reduce-start(%m), channel_id=1, to_apply=%add
  %ard = f32[8]{0} all-reduce-done(%ars)
  %any = pred[] all-reduce(%flag), channel_id=2, to_apply=%add
  %y = f32[4,8]{1,0} fusion(%x, %ard), kind=kLoop, calls=%fused_computation, metadata={op_name="jit(f)/sub"}
  ROOT %t = (f32[4,8]{1,0}, f32[8]{0}, f32[8]{0}, f32[8]{0}, f32[8]{0}, /*index=5*/pred[]) tuple(%y, %ard, %m, %m, %m, /*index=5*/%any)
}
"""


def test_instructions_of_the_entry_computation():
    insts = _hlo.instructions(COMPILED, entry_only=True)
    assert [i.name for i in insts] == ["x", "flag", "k", "m", "ars", "ard", "any", "y", "t"]
    k = insts[2]
    assert k.op == "custom-call" and k.target == "jaxbn_moments" and k.operands == ("x",)
    assert k.arrays == (_hlo.Array("f32", (8,)), _hlo.Array("f32", (8,)))
    assert insts[-1].operands == ("y", "ard", "m", "m", "m", "any")  # the /*index=5*/ comment is no operand
    assert len(_hlo.instructions(COMPILED)) == 9 + 3 + 4  # with the reducer and the fused computation


def test_counts():
    # The header's /*index=5*/ is no instruction; parameters, tuples and views launch nothing.
    assert [i.name for i in _hlo.kernels(COMPILED)] == ["k", "ars", "ard", "any", "y"]
    assert _hlo.count_ops(COMPILED, "all-reduce") == 2  # the async pair once, the scalar one
    assert _hlo.count_ops(COMPILED, "all-reduce", shape="pred[]") == 1
    assert _hlo.collectives(COMPILED) == {"all-reduce": 2, "all-gather": 0, "reduce-scatter": 0,
                                          "collective-permute": 0, "all-to-all": 0}
    assert _hlo.count_collectives(COMPILED) == 2
    assert _hlo.custom_calls(COMPILED) == {"jaxbn_moments": 1}
    assert not _hlo.custom_calls(COMPILED, "xla_")
    assert _hlo.custom_call_operands(COMPILED, "jaxbn_moments") == [((_hlo.Array("f32", (4, 8)),),)]


def test_bytes():
    assert _hlo.large_outputs(COMPILED, 32) == [("y", _hlo.Array("f32", (4, 8)))]
    # the custom call and the fusion read x (2 x 128 bytes), the fusion writes y (128 bytes)
    assert _hlo.traffic_bytes(COMPILED, 32) == 3 * 128
    assert _hlo.Array("bf16", (3, 5)).nbytes == 30 and _hlo.Array("pred", ()).nbytes == 1
    assert str(_hlo.Array("f32", (16, 6))) == "f32[16,6]"


def test_lowered_and_compiled_programs():
    x = jnp.ones((4, 8))
    lowered = _hlo.lowered_text(lambda x: jnp.sum(x * 2, 0), x)  # jitted for us
    compiled = _hlo.compiled_text(jax.jit(lambda x: jnp.sum(x * 2, 0)), x)
    assert _hlo.is_stablehlo(lowered) and not _hlo.is_stablehlo(compiled)
    assert _hlo.count_collectives(lowered) == 0 == _hlo.count_collectives(compiled)
    assert _hlo.kernels(compiled) and all(i.op not in _hlo.TRIVIAL for i in _hlo.kernels(compiled))


def test_stablehlo_collectives(ndev):
    mesh = jax.make_mesh((ndev,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    f = jax.shard_map(lambda x: jax.lax.psum(x, "d") + jax.lax.all_gather(x, "d").sum(0), mesh=mesh,
                      in_specs=jax.P("d"), out_specs=jax.P("d"))
    text = _hlo.lowered_text(f, jnp.ones((ndev, 4)))
    counts = _hlo.collectives(text)
    assert counts["all-reduce"] == 1 and counts["all-gather"] == 1 and _hlo.count_collectives(text) == 2
