"""The one hook mechanism: tensors collected by module path with forward hooks, during one forward pass.

Every place that reads a tensor from inside a model goes through :class:`FeatureHooks`:
:func:`~c2vkd_hf.models.features.forward_features` (a backbone's feature maps, the input of DPT's neck
or BEiT's FPN, torchvision's backbone stages, the input of the final classifier) and
:class:`~c2vkd_hf.models.torchvision_wrapper.TorchvisionForSemanticSegmentation` (its
``hidden_states``). A :class:`Tap` names a submodule by its dotted path (what
``nn.Module.get_submodule`` takes, e.g. ``"decode_head.classifier"``) and whether its input or its
output is read. The hooks live only inside a ``with`` block, so nothing stays on the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from torch import nn

__all__ = ["FeatureHooks", "Tap"]


@dataclass(frozen=True)
class Tap:
    """Where one tensor is read: the submodule at ``path`` (dotted, as ``nn.Module.get_submodule``
    takes it; ``""`` is the model itself) and ``read``: ``"output"`` (what the module returns, as it
    is) or ``"input"`` (its first positional argument, else its first keyword argument)."""

    path: str
    read: str = "output"

    def __post_init__(self):
        if self.read not in ("input", "output"):
            raise ValueError(f"Tap.read must be 'input' or 'output', got {self.read!r}")


class FeatureHooks:
    """Collects the tensors that ``taps`` (``{name: Tap}``) name while a ``with`` block runs::

        with FeatureHooks(model, {"decoder": Tap("decode_head.classifier", "input")}) as hooks:
            model(pixel_values=x)
        hooks.features["decoder"]

    The hooks are registered on entering the block (in the order of ``taps``) and removed on leaving
    it, also when the forward pass raises. A module called several times in one pass keeps its last
    call; a module that is not called leaves its name out of :attr:`features` (see :meth:`missing`).
    The model may be called through a wrapper (DDP, accelerate) as long as ``model`` is the module
    the paths start from.
    """

    def __init__(self, model: nn.Module, taps: Mapping[str, Tap]):
        self.model = model
        self.taps = dict(taps)
        self.features: dict[str, Any] = {}
        self._handles: list = []

    def __enter__(self) -> "FeatureHooks":
        self.features = {}
        try:
            for name, tap in self.taps.items():
                module = self.model.get_submodule(tap.path)
                if tap.read == "input":
                    handle = module.register_forward_pre_hook(self._input_hook(name), with_kwargs=True)
                else:
                    handle = module.register_forward_hook(self._output_hook(name))
                self._handles.append(handle)
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def remove(self) -> None:
        """Removes every hook this object registered (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def missing(self) -> list[str]:
        """The names of the taps whose module was not called."""
        return [name for name in self.taps if name not in self.features]

    def _input_hook(self, name: str):
        def hook(_module, args, kwargs):
            self.features[name] = args[0] if args else next(iter(kwargs.values()))

        return hook

    def _output_hook(self, name: str):
        def hook(_module, _args, output):
            self.features[name] = output

        return hook
