"""ExecuTorch's Core ML backend runs the ane:: passes when given ``pass_names()`` as its
``pass_pipeline`` compile spec (a list of registered coremltools pass names)."""


import coremltools as ct
import torch

from milpasses.pipeline import ANE_PASSES, ane_pipeline, pass_names
from milpasses.simulator import load_program, psnr, simulate

HIDDEN, HEADS, TOKENS = 32, 4, 8


class EncoderBlock(torch.nn.Module):
    """A pre-norm transformer encoder block in plain torch (no transformers: torch.export of
    transformers 5 models fails in coremltools' frontend, see ANE_NOTES)."""

    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(HIDDEN), torch.nn.LayerNorm(HIDDEN)
        self.qkv, self.out = torch.nn.Linear(HIDDEN, 3 * HIDDEN), torch.nn.Linear(HIDDEN, HIDDEN)
        self.up, self.down = torch.nn.Linear(HIDDEN, 4 * HIDDEN), torch.nn.Linear(4 * HIDDEN, HIDDEN)

    def forward(self, x):
        batch, tokens, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(HIDDEN, dim=-1)
        heads = [t.reshape(batch, tokens, HEADS, HIDDEN // HEADS).transpose(1, 2) for t in (q, k, v)]
        scores = heads[0] @ heads[1].transpose(-1, -2) * (HIDDEN // HEADS) ** -0.5
        attended = (scores.softmax(-1) @ heads[2]).transpose(1, 2).reshape(batch, tokens, HIDDEN)
        x = x + self.out(attended)
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm2(x))))


def test_pass_names_are_ane_pipeline_in_order():
    names = pass_names()
    assert names == ane_pipeline().passes
    assert [n for n in names if n.startswith("ane::")] == list(ANE_PASSES)
    assert [n for n in names if not n.startswith("ane::")] == ct.PassPipeline.DEFAULT.passes


def test_executorch_core_ml_backend_runs_the_ane_passes(tmp_path):
    from executorch.backends.apple.coreml import executorchcoreml
    from executorch.backends.apple.coreml.compiler import CoreMLBackend
    from executorch.backends.apple.coreml.partition import CoreMLPartitioner
    from executorch.exir import to_edge_transform_and_lower

    torch.manual_seed(0)
    block = EncoderBlock().eval()
    x = torch.randn(1, TOKENS, HIDDEN)
    specs = CoreMLBackend.generate_compile_specs(compute_unit=ct.ComputeUnit.CPU_AND_NE,
                                                 minimum_deployment_target=ct.target.iOS16,
                                                 pass_names=pass_names())
    lowered = to_edge_transform_and_lower(torch.export.export(block, (x,)),
                                          partitioner=[CoreMLPartitioner(compile_specs=specs)])
    delegates = [m for _, m in lowered.exported_program().graph_module.named_children()
                 if getattr(m, "backend_id", None) == "CoreMLBackend"]
    assert len(delegates) == 1  # the whole block went to Core ML
    assert executorchcoreml.unflatten_directory_contents(delegates[0].processed_bytes, str(tmp_path))
    package = tmp_path / "lowered_module" / "model.mlpackage"
    ops = [op.op_type for op in load_program(package).functions["main"].operations]
    assert "linear" not in ops and ops.count("conv") == 4  # qkv, out, up, down as 1x1 convs
    assert "einsum" in ops  # attention split per head
    (name,) = [v.name for v in load_program(package).functions["main"].inputs.values()]
    (output,) = simulate(package, {name: x.numpy()}).values()
    with torch.no_grad():
        assert psnr(block(x).numpy(), output) > 60
