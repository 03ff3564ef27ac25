"""MoCo v2 self-supervised pre-training: the model maths (like facebookresearch/moco's builder.py).

MoCo (He et al. 2020; v2: Chen et al. 2020) trains a query encoder so that two views of one image
match each other better than a queue of keys from earlier batches. The key encoder is an EMA of the
query encoder (no gradient), so the queued keys stay consistent; a 2-layer MLP projects features
to 128-d; the loss is InfoNCE with temperature 0.2.

Written here in the style of facebookresearch/moco rather than with `lightly`: lightly is not
installed, and its MoCo parts (projection head, memory bank, momentum update) cover only part of
what we need: the key gathering across DDP processes before the queue update and the shuffle-BN
that stops BatchNorm from leaking which key is the positive are a few dozen lines either way, and
a self-contained module is easier to read than lightly's blocks plus adapters.

Under DDP (Lightning's strategy), each step gathers every process's keys before the queue update,
so all queues stay identical, and shuffles the key batch across processes before the key encoder
(BatchNorm statistics of a query and its key then come from different samples). One process
works unchanged (no shuffle: its batch statistics are shared as in MoCo's single-GPU variants).

The stage lifecycle runs it through training/objectives/moco.py, whose output is a chextrain
bundle holding the query ENCODER (heads untrained, meta `objective: moco`), which supervised
stages start from with `init: stage:NAME` or the folder.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from chextrain.data.transforms import Preprocessing, as_preprocessing, to_network_input
from chextrain.training.finite import not_finite_on_any_rank
from chextrain.training.optim import cosine, make_optimizer
from chextrain.training.specs import MocoSpec, OptimizerSpec
from chextrain.training.stage_errors import NonFiniteError, non_finite_message


def projection_mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """MoCo v2's projection head: Linear -> ReLU -> Linear (features B x F -> B x out_dim)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


@torch.no_grad()
def momentum_update(key: nn.Module, query: nn.Module, m: float) -> None:
    """key <- m * key + (1 - m) * query, parameter by parameter (buffers are left alone, as in MoCo)."""
    for pk, pq in zip(key.parameters(), query.parameters(), strict=True):
        pk.mul_(m).add_(pq.detach(), alpha=1.0 - m)


def info_nce(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE of queries against their keys (positives) and the queue (negatives).

    q, k: B x D, L2-normalised; queue: D x K, L2-normalised columns. Returns (mean cross-entropy,
    logits B x (1 + K)) with each query's positive in column 0.
    """
    l_pos = (q * k).sum(dim=1, keepdim=True)  # B x 1
    l_neg = q @ queue  # B x K
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature  # B x (1 + K)
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, labels), logits


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def gather_sizes(n: int, device: torch.device) -> list[int]:
    """Every process's value of n (its batch size)."""
    _, size = world()
    if size == 1:
        return [n]
    mine = torch.tensor([n], device=device)
    out = [torch.zeros_like(mine) for _ in range(size)]
    dist.all_gather(out, mine)
    return [int(t) for t in out]


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x (B x ...) from every process in rank order: (sum of B) x ...; no gradient."""
    _, size = world()
    if size == 1:
        return x
    sizes = gather_sizes(x.shape[0], x.device)
    pad = max(sizes) - x.shape[0]
    if pad:  # all_gather needs equal shapes
        x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
    out = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(out, x.contiguous())
    return torch.cat([o[:s] for o, s in zip(out, sizes, strict=True)])


@torch.no_grad()
def batch_shuffle(x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Shuffle-BN, step 1: this process's share of a random permutation of every process's batch.

    Returns (x' B x ..., the inverse permutation for batch_unshuffle). One process, or batch
    sizes that differ between processes this step: x unchanged and None.
    """
    rank, size = world()
    if size == 1 or len(set(gather_sizes(x.shape[0], x.device))) > 1:
        return x, None
    gathered = concat_all_gather(x)  # (W*B) x ...
    perm = torch.randperm(gathered.shape[0], generator=generator).to(x.device)
    dist.broadcast(perm, src=0)  # every process uses rank 0's permutation
    return gathered[perm.view(size, -1)[rank]], torch.argsort(perm)


@torch.no_grad()
def batch_unshuffle(x: torch.Tensor, unshuffle: torch.Tensor | None) -> torch.Tensor:
    """Shuffle-BN, step 2: the keys of this process's own samples, in their original order."""
    if unshuffle is None:
        return x
    rank, size = world()
    return concat_all_gather(x)[unshuffle.view(size, -1)[rank]]


class MocoModule(L.LightningModule):
    """MoCo v2 on batches {"view1", "view2"} (training.moco_data): uint8 B x 1 x S x S, made the
    network input on the device here (transforms.to_network_input), or float B x 3 x S x S as is.

    Args:
        encoder: the query encoder (images -> features B x F), e.g. CXRNet(...).encoder; trained in place.
        num_features: F.
        spec: queue size, momentum, temperature, projection sizes, schedule, shuffle-BN.
        optimizer: the stage's optimiser (over the query encoder and its projection).
        seed: seeds the initial queue and the shuffle-BN permutations.
        preprocessing: how uint8 views become the network input (the stage's).
        stage_name: named by the error that stops a stage whose loss is NaN / inf.
    """

    def __init__(
        self,
        encoder: nn.Module,
        num_features: int,
        *,
        spec: MocoSpec = MocoSpec(),
        optimizer: OptimizerSpec = OptimizerSpec(),
        seed: int = 0,
        preprocessing: str | Preprocessing = "imagenet",
        stage_name: str = "moco",
    ) -> None:
        super().__init__()
        self.spec, self.optimizer_spec, self.stage_name = spec, optimizer, stage_name
        self.preprocessing = as_preprocessing(preprocessing)
        self.encoder_q = encoder
        self.projection_q = projection_mlp(num_features, spec.hidden_dim or num_features, spec.proj_dim)
        self.encoder_k = copy.deepcopy(encoder).requires_grad_(False)  # starts equal to the query
        self.projection_k = copy.deepcopy(self.projection_q).requires_grad_(False)
        g = torch.Generator().manual_seed(seed)
        queue = torch.randn(spec.proj_dim, spec.queue_size, generator=g)  # D x K
        self.register_buffer("queue", F.normalize(queue, dim=0))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.shuffle_generator = torch.Generator().manual_seed(seed + 1)
        self.samples_seen = 0  # training samples this rank has seen (checkpointed)
        self.samples_per_rank: list[int] = []
        self.last: dict[str, float] = {}

    def query(self, images: torch.Tensor) -> torch.Tensor:
        """images B x 3 x S x S -> normalised projections B x D (with gradient)."""
        return F.normalize(self.projection_q(self.encoder_q(images)).float(), dim=1)

    @torch.no_grad()
    def key(self, images: torch.Tensor) -> torch.Tensor:
        """images B x 3 x S x S -> normalised key projections B x D (shuffle-BN under DDP)."""
        shuffled, unshuffle = (
            batch_shuffle(images, self.shuffle_generator) if self.spec.shuffle_bn else (images, None)
        )
        k = F.normalize(self.projection_k(self.encoder_k(shuffled)).float(), dim=1)
        return batch_unshuffle(k, unshuffle)

    @torch.no_grad()
    def momentum_step(self) -> None:
        """Move the key encoder and projection towards the query ones (EMA)."""
        momentum_update(self.encoder_k, self.encoder_q, self.spec.momentum)
        momentum_update(self.projection_k, self.projection_q, self.spec.momentum)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write every process's keys (B x D here) into the queue at its pointer, wrapping around."""
        keys = concat_all_gather(keys)  # (W*B) x D
        size = self.queue.shape[1]
        keys = keys[-size:]  # more keys than the queue holds: the newest fill it
        n, ptr = keys.shape[0], int(self.queue_ptr)
        idx = (ptr + torch.arange(n, device=keys.device)) % size
        self.queue[:, idx] = keys.T.to(self.queue.dtype)
        self.queue_ptr.fill_((ptr + n) % size)

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One MoCo step's loss and logits B x (1 + K); updates the key encoder and the queue."""
        q = self.query(im_q)  # B x D
        self.momentum_step()
        k = self.key(im_k)  # B x D
        with torch.autocast(q.device.type, enabled=False):  # similarities in float32 under AMP too
            loss, logits = info_nce(q, k, self.queue.clone().detach(), self.spec.temperature)
        self.enqueue(k)
        return loss, logits

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        views = [batch[k] for k in ("view1", "view2")]
        loss, logits = self(
            *(to_network_input(v, self.preprocessing) if v.dtype == torch.uint8 else v for v in views)
        )
        self._stop_if_not_finite(loss)
        n = logits.shape[0]
        acc = (logits.argmax(dim=1) == 0).float().mean()  # the positive beats every negative
        self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=n)
        self.log("train/acc1", acc, on_step=True, batch_size=n)
        self.samples_seen += n
        self.last = {"loss": float(loss.detach()), "acc1": float(acc)}
        return loss

    def _stop_if_not_finite(self, loss: torch.Tensor) -> None:
        """Raise NonFiniteError when the loss is NaN / inf on any rank, before the weights see it."""
        if not not_finite_on_any_rank(self, loss):
            return
        if not all(bool(torch.isfinite(w.detach()).all()) for w in self.encoder_q.parameters()):
            hint = (
                "the encoder's weights hold NaN or inf values: check the init weights, "
                "or lower the learning rate"
            )
        else:
            hint = (
                f"lower the learning rate (optimizer.lr = {self.optimizer_spec.lr:g}) or raise the MoCo "
                f"temperature (moco.temperature = {self.spec.temperature:g}), or check the input files"
            )
        raise NonFiniteError(
            non_finite_message(
                self.stage_name,
                f"the MoCo loss is {float(loss.detach())}",
                f"at training step {self.global_step + 1} (epoch {self.current_epoch})",
                hint,
            )
        )

    def configure_optimizers(self) -> Any:
        params = [*self.encoder_q.parameters(), *self.projection_q.parameters()]
        optimizer = make_optimizer(params, self.optimizer_spec)
        if self.spec.schedule == "none":
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_train_end(self) -> None:
        seen = torch.tensor([self.samples_seen], device=self.device)
        self.samples_per_rank = [int(v) for v in self.all_gather(seen).flatten().tolist()]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["samples_seen"] = self.samples_seen

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.samples_seen = int(checkpoint.get("samples_seen", 0))
