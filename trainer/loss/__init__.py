from trainer.loss.dino_clstoken_loss import DINOLoss
from trainer.loss.ibot_patch_loss import iBOTPatchLoss
from trainer.loss.koleo_loss import KoLeoLoss
from trainer.loss.sinkhorn_knopp import sinkhorn_knopp
