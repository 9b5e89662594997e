"""Model surgery: pick target modules, replace them, and run a model block by block
(sequential calibration) so each block is compressed on its compressed predecessor's outputs."""
from shrink.surgery.capture import BlockInputs, SequentialRunner, capture_block_inputs, find_blocks
from shrink.surgery.fold import FoldSource, find_fold_source, fold_into
from shrink.surgery.heads import AttentionGroup, find_attention, remove_heads, update_config
from shrink.surgery.patches import conv_patches
from shrink.surgery.replace import get_module, replace_module, undo
from shrink.surgery.select import Selection, Skipped, Target, kind_of, select_modules
from shrink.surgery.shapes import apply_resized, resized_modules
# shrink_dims.find_blocks (transformer layer lists only) stays under its module: the package's
# find_blocks is capture's, which returns the same list for Llama, GPT-2 and BERT.
from shrink.surgery.shrink_dims import NeuronGroup, find_neuron_groups, remove_layers, remove_units

__all__ = [
    "BlockInputs", "SequentialRunner", "capture_block_inputs", "find_blocks",
    "FoldSource", "find_fold_source", "fold_into",
    "conv_patches",
    "AttentionGroup", "find_attention", "remove_heads", "update_config",
    "apply_resized", "resized_modules",
    "NeuronGroup", "find_neuron_groups", "remove_layers", "remove_units",
    "get_module", "replace_module", "undo",
    "Selection", "Skipped", "Target", "kind_of", "select_modules",
]
