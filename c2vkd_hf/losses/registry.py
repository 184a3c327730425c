"""Name registry of the distillation losses: one entry point, :func:`get_loss`.

A loss class is registered with the :func:`register_loss` decorator under a short name (the
``--method`` value); :func:`get_loss` instantiates it with keyword arguments.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Type, TypeVar

from torch import nn

__all__ = ["register_loss", "get_loss", "available_losses"]

_REGISTRY: Dict[str, Type[nn.Module]] = {}

_C = TypeVar("_C", bound=Type[nn.Module])


def register_loss(name: str) -> Callable[[_C], _C]:
    """Class decorator registering a loss module under ``name`` (lower-case)."""
    key = name.lower()

    def decorator(cls: _C) -> _C:
        if key in _REGISTRY and _REGISTRY[key] is not cls:
            raise ValueError(f"a loss is already registered under {key!r}: {_REGISTRY[key].__name__}")
        _REGISTRY[key] = cls
        cls.method_name = key
        return cls

    return decorator


def available_losses() -> List[str]:
    """Registered loss names, sorted."""
    return sorted(_REGISTRY)


def get_loss(name: str, *args, **kwargs) -> nn.Module:
    """Instantiate the loss registered as ``name`` with ``args`` and ``kwargs`` (C2VKD: its
    :class:`~c2vkd_hf.losses.c2vkd_config.C2VKDConfig` first).

    Raises:
        ValueError: unknown name (the message lists the valid names), or an invalid weight /
            temperature in ``kwargs``.
        TypeError: a keyword the loss does not accept.
    """
    key = str(name).strip().lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(available_losses())}")
    return _REGISTRY[key](*args, **kwargs)
