"""SyncBatchNorm for every device: PyTorch's own on CUDA, an all-reduce version on CPU (gloo), where PyTorch has none.

Batch statistics over the whole global batch make a DDP run take the same steps as one process with the same
global batch; that is what lets a user move a run between machines with different numbers of devices.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from lightning.pytorch.plugins.layer_sync import LayerSync, TorchSyncBatchNorm
from torch import nn


class AllReduceBatchNorm2d(nn.modules.batchnorm._BatchNorm):
    """BatchNorm2d whose training statistics are summed over all processes (differentiably, so the gradient
    through the statistics is the one-process gradient too)."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"expected a 4-d input, got {x.dim()}-d")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return super().forward(x)
        c = x.shape[1]
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 statistics are summed in float32
        local = torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)),
                           torch.tensor([xf.numel() / c], dtype=xf.dtype, device=x.device)])
        with warnings.catch_warnings():  # its successor is not differentiable yet
            warnings.simplefilter("ignore", FutureWarning)
            total = dist_fn.all_reduce(local)
        n = total[-1]
        mean = total[:c] / n
        var = (total[c:2 * c] / n - mean * mean).clamp(min=0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach().to(self.running_mean.dtype), alpha=m)
                unbiased = var.detach() * n / (n - 1).clamp(min=1)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        y = (xf - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def _swap(module: nn.Module, cls: type[nn.modules.batchnorm._BatchNorm], kinds: tuple[type, ...]) -> nn.Module:
    out = module
    if isinstance(module, kinds) and type(module) is not cls:
        out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if module.affine:
            with torch.no_grad():
                out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _swap(child, cls, kinds))
    return out


class AnyDeviceSyncBatchNorm(LayerSync):
    """Lightning's layer-sync plugin: torch's SyncBatchNorm on GPUs, :class:`AllReduceBatchNorm2d` elsewhere."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def apply(self, model: nn.Module) -> nn.Module:
        if self.cuda:
            return TorchSyncBatchNorm().apply(model)
        return _swap(model, AllReduceBatchNorm2d, (nn.BatchNorm2d,))

    def revert(self, model: nn.Module) -> nn.Module:
        if self.cuda:
            return TorchSyncBatchNorm().revert(model)
        return _swap(model, nn.BatchNorm2d, (AllReduceBatchNorm2d,))
