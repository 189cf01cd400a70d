"""Low-rank adapters (LoRA) for any lepton_jax linen model, done on the params
tree (weight-delta form), with a frozen base stored in float32, bfloat16 or
int8 and adapters saved apart from it.

``LoRAConfig`` selects the weights; ``init``/``merge``/``freeze`` work on
params trees; ``LoRA`` wraps a model for ``train.make_train_step``;
``create_train_state`` builds its state; ``save_adapters``/``load_adapters``
keep the adapters in a small folder.
"""

from lepton_jax.lora.adapters import BASE_DTYPES, LoRAConfig, freeze, init, input_dims, merge
from lepton_jax.lora.files import ADAPTERS_FILE, CONFIG_FILE, load_adapters, save_adapters
from lepton_jax.lora.model import BASE_COLLECTION, LoRA, create_train_state

__all__ = [
    "ADAPTERS_FILE", "BASE_COLLECTION", "BASE_DTYPES", "CONFIG_FILE", "LoRA", "LoRAConfig",
    "create_train_state", "freeze", "init", "input_dims", "load_adapters", "merge", "save_adapters",
]
