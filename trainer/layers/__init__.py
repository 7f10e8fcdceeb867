from trainer.layers.attention import Attention
from trainer.layers.block import Block
from trainer.layers.dino_head import DINOHead
from trainer.layers.drop_path import DropPath
from trainer.layers.layer_scale import LayerScale
from trainer.layers.mlp import Mlp
from trainer.layers.patch_embed import PatchEmbed
