from trainer.loss.dino_clstoken_loss import DINOLoss
from trainer.loss.koleo_loss import KoLeoLoss
