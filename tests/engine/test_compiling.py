import torch

from mimco.engine.compiling import compile_method, is_compiled
from tests.helpers import tiny_mimco


def test_every_block_patch_embedding_and_head_is_compiled_in_place():
    m = tiny_mimco()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    n = compile_method(m)
    want = [m.student.backbone.patch_embed, *m.student.backbone.blocks, m.teacher.patch_embed, *m.teacher.blocks,
            *(h for h in (m.patch_head, m.image_head) if h is not None)]
    assert n == len(want) and all(is_compiled(x) for x in want)
    assert not is_compiled(m) and not is_compiled(m.student.backbone)  # the method's forward stays eager
    after = m.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_a_head_with_syncbatchnorm_stays_eager():
    """MoCo's heads under DDP on GPUs hold SyncBatchNorm (its collectives sit inside an autograd
    Function): they are left eager, the blocks and patch embeddings compiled."""
    from mimco.config import ModelConfig
    from mimco.methods import MoCoV3
    from mimco.models import create_vit

    moco = torch.nn.SyncBatchNorm.convert_sync_batchnorm(MoCoV3(create_vit(ModelConfig(patch_size=4, embed_dim=32,
                                                                                        depth=2, num_heads=2), 16), 32,
                                                                64))
    n = compile_method(moco)
    assert n == 2 * (1 + 2)  # base and momentum encoders: patch embedding + 2 blocks each; no head
    assert not is_compiled(moco.predictor) and not is_compiled(moco.base_encoder.head)
    plain = MoCoV3(create_vit(ModelConfig(patch_size=4, embed_dim=32, depth=2, num_heads=2), 16), 32, 64)
    assert compile_method(plain) == 2 * (1 + 2) + 3 and is_compiled(plain.predictor)  # plain BatchNorm: compiled


def test_an_eva_teacher_is_compiled_too():
    import timm
    from torch import nn

    from mimco.methods import MethodDefaults

    class Holder(MethodDefaults, nn.Module):  # the contract's default compile_targets(): every ViT's parts
        def __init__(self, teacher: nn.Module) -> None:
            super().__init__()
            self.teacher = teacher

    eva = timm.create_model("eva02_tiny_patch14_224", pretrained=False, num_classes=0, img_size=28, depth=2)
    assert compile_method(Holder(eva)) == 3 and all(is_compiled(x) for x in (eva.patch_embed, *eva.blocks))


class _Linears(torch.nn.Module):
    """A method whose compile targets are ``n`` modules of distinct shapes: every module compiled in
    place runs through one shared code object, so each holds its own entries in one dynamo cache."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(i + 1, 2) for i in range(n))

    def compile_targets(self):
        return list(self.layers)

    def run(self):
        for i, layer in enumerate(self.layers):
            layer(torch.randn(3, i + 1)).sum().backward()  # training
        with torch.no_grad():
            for i, layer in enumerate(self.layers):
                layer(torch.randn(5, i + 1))  # evaluation: no_grad, another batch size


def test_more_compiled_modules_than_dynamos_recompile_limit_all_run_compiled(capsys):
    """Past ``torch._dynamo.config.recompile_limit`` (8) the modules left would run eager without a
    word: compile_method raises the limit to cover what it compiled."""
    from torch._dynamo.utils import counters

    from mimco.engine.compiling import limit_hits, report_recompile_limit

    torch._dynamo.reset()
    m, hits, graphs = _Linears(12), limit_hits(), counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(recompile_limit=8, accumulated_recompile_limit=256):  # defaults, restored after
        assert compile_method(m, backend="eager") == 12
        m.run()
    assert limit_hits() == hits and counters["stats"]["unique_graphs"] - graphs >= 12 * 2
    assert report_recompile_limit(12) == 0 and "mimco:" not in capsys.readouterr().err


def test_a_recompile_limit_hit_anyway_is_one_line(capsys):
    from mimco.engine.compiling import report_recompile_limit

    torch._dynamo.reset()
    m = _Linears(4)
    with torch._dynamo.config.patch(recompile_limit=8, accumulated_recompile_limit=256):
        compile_method(m, backend="eager")
        torch._dynamo.config.recompile_limit = 2  # fewer than the 4 modules' entries: the rest runs eager
        m.run()
    assert report_recompile_limit(4) > 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mimco:")]
    assert len(err) == 1 and "torch.compile hit its recompile limit" in err[0] and "ran eager" in err[0]
