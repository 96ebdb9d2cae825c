"""Optional packages: which flag needs which, and the one line that says how to get it.

minisft itself runs on torch, transformers, safetensors, datasets, bitsandbytes, numpy and rich.
A few flags reach further:

    --attn_implementation flash_attention_2   flash-attn, and a CUDA GPU
    --attn_implementation flash_attention_3   flash-attn-3 (FlashAttention's hopper/ build), and a Hopper GPU
    --report_to tensorboard|wandb|trackio|mlflow   the tracker's package of that name
    --optim adamw_8bit, --load_in_4bit        bitsandbytes, which must also load on this platform
    python -m minisft.plot                    matplotlib

A missing one is a user's fix, not a bug: it is answered with one line that names the flag and the
`pip install` that fixes it (exit status 2, no traceback). The loop's check_flags asks for all of a
run's packages before any work starts, so a missing one costs a second, not a data preparation.
"""

from __future__ import annotations

import importlib
import importlib.util

from minisft.errors import UserError

FLASH_ATTENTION = {
    # implementation: (module, the fix)
    "flash_attention_2": ("flash_attn", "pip install flash-attn --no-build-isolation"),
    "flash_attention_3": ("flash_attn_interface", "build and install the hopper/ folder of Dao-AILab/flash-attention"),
}


class MissingPackageError(UserError, ImportError):
    """A flag needs a package that is not installed, or that cannot load here."""


def import_optional(module: str, flag: str, package: str, install: str):
    """Import `module` for `flag`, or say in one line which flag needs `package` and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingPackageError(f"{flag} needs the {package} package: {install}") from None
    except Exception as error:  # installed, but its native library cannot load on this platform
        raise MissingPackageError(
            f"{flag} needs {package}, which is installed but cannot load here ({error}); try: {install} --upgrade"
        ) from None


def import_bitsandbytes(flag: str):
    return import_optional("bitsandbytes", flag, "bitsandbytes", "pip install bitsandbytes")


def check_attention_implementation(name: str) -> None:
    """FlashAttention needs its package and a CUDA GPU; transformers would otherwise fail deep in model loading."""
    if name not in FLASH_ATTENTION:
        return
    import torch
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

    if (is_flash_attn_2_available if name == "flash_attention_2" else is_flash_attn_3_available)():
        return
    flag = f"--attn_implementation {name}"
    module, install = FLASH_ATTENTION[name]
    if importlib.util.find_spec(module) is None:
        raise MissingPackageError(
            f"{flag} needs the {module} package and a CUDA GPU: {install} (without a GPU: --attn_implementation sdpa)"
        )
    if not torch.cuda.is_available():
        raise MissingPackageError(f"{flag} needs a CUDA GPU, and none is visible here: use --attn_implementation sdpa")
    raise MissingPackageError(f"{flag}: transformers cannot use the installed {module} (too old?): {install} --upgrade")
