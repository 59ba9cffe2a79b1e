import torch

from mimco.engine.compiling import compile_method, is_compiled
from tests.conftest import tiny_mimco


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
