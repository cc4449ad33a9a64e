"""A 16-bit ``nn.Linear`` with LoRA adapters applied as an unmerged delta (exact to unload)."""

from __future__ import annotations

import torch
import torch.nn as nn


class AdapterSet:
    """Named low-rank adapters ``(A [r, K], B [N, r], strength)``; B already carries alpha/r."""

    def __init__(self):
        self.adapters: dict[str, list] = {}

    def add_adapter(self, name: str, down: torch.Tensor, up: torch.Tensor, strength: float = 1.0) -> None:
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} is already on this layer")
        self.adapters[name] = [down, up, float(strength)]
        self._adapters_changed()

    def set_adapter_strength(self, name: str, strength: float) -> None:
        self.adapters[name][2] = float(strength)
        self._adapters_changed()

    def remove_adapter(self, name: str) -> None:
        del self.adapters[name]
        self._adapters_changed()

    def _adapters_changed(self) -> None:
        pass


class LoRALinear(nn.Module, AdapterSet):
    """``base(x) + Σ s · (x·Aᵀ)·Bᵀ``, computed in fp32 and added in the output dtype."""

    def __init__(self, base: nn.Linear):
        nn.Module.__init__(self)
        AdapterSet.__init__(self)
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features

    def add_adapter(self, name, down, up, strength=1.0):
        dev = self.base.weight.device
        super().add_adapter(name, down.to(dev, torch.float32), up.to(dev, torch.float32), strength)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.adapters:
            return y
        dev = self.base.weight.device
        for entry in self.adapters.values():
            if entry[0].device != dev:
                # the base layer moved (.to(), or an offload hook assigning .data): the adapters follow it
                entry[0], entry[1] = entry[0].to(dev), entry[1].to(dev)
        xf = x.float()
        delta = sum(s * ((xf @ a.T) @ b.T) for a, b, s in self.adapters.values() if s != 0)
        return y + delta.to(y.dtype) if torch.is_tensor(delta) else y
