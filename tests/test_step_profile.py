"""`capture_jax.bench.step_profile` reads a real trace of the train step back to its sources."""

from capture_jax.bench import step_profile
from tests.helpers import tiny_config

HLO = """
  %fusion.3 = f32[8,32]{1,0} fusion(%p0, %p1), kind=kLoop, calls=%fused_computation.3, metadata={op_type="dot_general" op_name="jit(train_step)/jvp(CaptureModel)/text_stream/layer_0/ffn/intermediate/dot_general" source_file="x.py"}
  ROOT %ynn_fusion.7 = f32[32,8]{1,0} fusion(%a, %b), kind=kCustom, metadata={op_name="jit(train_step)/transpose(jvp(CaptureModel))/coattention/layer_1/dense1/dot_general"}
  %multiply_add_fusion.2 = f32[32]{0} fusion(%c), kind=kLoop, metadata={op_name="jit(train_step)/cond/branch_1_fun/mul"}
"""


def test_the_hlo_metadata_names_pass_operation_and_scope():
  names = step_profile.hlo_op_names(HLO)
  assert step_profile.classify(names['fusion.3']) == ('forward', 'dot_general', 'text_stream')
  assert step_profile.classify(names['ynn_fusion.7']) == ('backward', 'dot_general', 'coattention')
  assert step_profile.classify(names['multiply_add_fusion.2']) == (
      'other',
      'mul',
      '(outside the model)',
  )
  assert step_profile.classify(None) == ('other', '(xla)', '(xla)')


def test_summary_is_per_step():
  names = step_profile.hlo_op_names(HLO)
  events = [
      {'name': 'fusion.3', 'dur': 3000.0},  # microseconds
      {'name': 'fusion.3', 'dur': 1000.0},
      {'name': 'copy.12', 'dur': 500.0},
  ]
  tables = step_profile.summarize(events, names, steps=2)
  assert tables['pass']['forward'] == [2.0, 1.0]  # ms per step, ops per step
  assert tables['pass']['other'] == [0.25, 0.5]
  assert tables['op']['forward  dot_general [fusion]'] == [2.0, 1.0]
  assert tables['scope']['other    (xla)'] == [0.25, 0.5]


def test_a_real_trace_of_the_tiny_step_is_read_back():
  cfg = tiny_config(num_hidden_layers=1, v_num_hidden_layers=1, co_num_layers=1, cross_num_layers=1)
  cfg.data.max_regions = 8  # 16 tokens + 9 regions fit the tiny cross_max_position_embeddings
  result = step_profile.profile_step(cfg, batch_size=4, steps=1, warmup=1)
  passes = result['tables']['pass']
  assert result['ops_per_step'] > 100 and result['wall_s'] > 0
  assert {'forward', 'backward', 'other'} <= set(passes)
  total = sum(ms for ms, _ in passes.values())
  # Most op time is traced back to the model's forward and backward pass: if the trace or the
  # HLO metadata format changed, this falls to ~0 and the tool's tables would be meaningless.
  assert (passes['forward'][0] + passes['backward'][0]) / total > 0.5, passes
  scopes = {key.split()[-1] for key in result['tables']['scope']}
  assert {'text_stream', 'coattention', 'co_transformer'} <= scopes, scopes
