"""`capture_jax.bench.step_profile` reads a real trace of the train step back to its sources."""

import os

from capture_jax.bench import step_profile
from tests.helpers import tiny_config

HLO = """
  %fusion.3 = f32[8,32]{1,0} fusion(%p0, %p1), kind=kLoop, calls=%fused_computation.3, metadata={op_type="dot_general" op_name="jit(train_step)/jvp(CaptureModel)/text_stream/layer_0/ffn/intermediate/dot_general" source_file="x.py"}
  ROOT %ynn_fusion.7 = f32[32,8]{1,0} fusion(%a, %b), kind=kCustom, metadata={op_name="jit(train_step)/transpose(jvp(CaptureModel))/coattention/layer_1/dense1/dot_general"}
  %multiply_add_fusion.2 = f32[32]{0} fusion(%c), kind=kLoop, metadata={op_name="jit(train_step)/cond/branch_1_fun/mul"}
  %copy.12 = f32[32]{0} copy(%c)
  %while.4 = (s32[], f32[8]{0}) while(%t), condition=%cond.1, body=%body.1, metadata={op_name="jit(train_step)/jvp(CaptureModel)/Dropout_0/while"}
"""


def test_the_hlo_names_opcode_pass_operation_and_scope():
  instructions = step_profile.hlo_instructions(HLO)
  assert {name: i.opcode for name, i in instructions.items()} == {
      'fusion.3': 'fusion',
      'ynn_fusion.7': 'fusion',
      'multiply_add_fusion.2': 'fusion',
      'copy.12': 'copy',
      'while.4': 'while',  # after a tuple shape
  }
  classify = lambda name: step_profile.classify(instructions[name].op_name)
  assert classify('fusion.3') == ('forward', 'dot_general', 'text_stream')
  assert classify('ynn_fusion.7') == ('backward', 'dot_general', 'coattention')
  assert classify('multiply_add_fusion.2') == ('other', 'mul', '(outside the model)')
  assert classify('copy.12') == ('other', '(xla)', '(xla)')


def test_spans_keep_program_ops_run_to_their_end_marker_and_skip_control_flow():
  instructions = step_profile.hlo_instructions(HLO)
  events = [  # microseconds
      {'ph': 'X', 'name': 'while.4', 'ts': 0.0, 'dur': 100.0},  # contains the ops below
      {'ph': 'X', 'name': 'fusion.3', 'ts': 10.0, 'dur': 30.0},
      {'ph': 'X', 'name': 'copy.12', 'ts': 50.0, 'dur': 2.0},  # asynchronous: done at its marker
      {'ph': 'X', 'name': 'ThunkExecutor::Execute', 'ts': 0.0, 'dur': 500.0},
      {'ph': 'X', 'name': 'end: copy.12', 'ts': 58.0, 'dur': 0.1},
      {'ph': 'X', 'name': 'fusion.3', 'ts': 200.0, 'dur': 10.0},  # the second step
      {'ph': 'X', 'name': 'end: fusion.3', 'ts': 205.0, 'dur': 0.1},  # inside its span
  ]
  spans = step_profile.op_spans(events, instructions)
  assert spans == [('fusion.3', 30.0), ('copy.12', 8.0), ('fusion.3', 10.0)]
  tables = step_profile.summarize(spans, instructions, steps=2)
  assert tables['pass']['forward'] == (0.02, 1.0)  # ms per step, ops per step
  assert tables['pass']['other'] == (0.004, 0.5)
  assert tables['op']['forward  dot_general [fusion]'] == (0.02, 1.0)
  assert tables['scope']['other    (xla)'] == (0.004, 0.5)


def test_a_real_trace_of_the_tiny_step_is_read_back():
  cfg = tiny_config(num_hidden_layers=1, v_num_hidden_layers=1, co_num_layers=1, cross_num_layers=1)
  cfg.data.max_regions = 8  # 16 tokens + 9 regions fit the tiny cross_max_position_embeddings
  result = step_profile.profile_step(cfg, batch_size=4, steps=2, warmup=1)
  passes = result['tables']['pass']
  assert result['ops_per_step'] > 100 and result['traced_wall_s'] > 0
  assert {'forward', 'backward', 'other'} <= set(passes)
  total_ms = sum(ms for ms, _ in passes.values())
  # Most op time is traced back to the model's forward and backward pass: if the trace or the
  # HLO metadata format changed, this falls to ~0 and the tool's tables would be meaningless.
  assert (passes['forward'].ms_per_step + passes['backward'].ms_per_step) / total_ms > 0.5, passes
  # No time counted twice (a loop and its body): the ops fit in the threads' wall time.
  threads = (os.cpu_count() or 1) + 1  # XLA's pool and the calling thread
  assert total_ms <= threads * 1e3 * result['traced_wall_s'], (total_ms, result['traced_wall_s'])
  scopes = {key.split()[-1] for key in result['tables']['scope']}
  assert {'text_stream', 'coattention', 'co_transformer'} <= scopes, scopes
